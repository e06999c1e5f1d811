//! Every kernel in kernels/ compiles to PTX with NVRTC, with no warnings, for the
//! architectures the worker targets. Needs libnvrtc only (no GPU): scripts/test.sh puts
//! PyPI's nvidia-cuda-nvrtc-cu12 on LD_LIBRARY_PATH and sets GPUSCALE_NVRTC_LIB_DIR, and
//! then a missing NVRTC is a failure, not a skip.

use inference_worker::backend::cuda::kernels::{self, SOURCES};

fn nvrtc_or_skip() -> bool {
    if kernels::nvrtc_present() {
        return true;
    }
    assert!(
        std::env::var_os("GPUSCALE_NVRTC_LIB_DIR").is_none(),
        "GPUSCALE_NVRTC_LIB_DIR is set but libnvrtc.so.12 does not load (is it on LD_LIBRARY_PATH?)"
    );
    eprintln!("SKIPPED: libnvrtc.so.12 not found (scripts/test.sh installs it)");
    false
}

#[test]
fn every_kernel_compiles_to_ptx_without_warnings() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = kernels::nvrtc_version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    // Ampere (A100, L4 is 89) and Hopper (H100/H200).
    for arch in [80, 89, 90] {
        for src in SOURCES {
            let c = kernels::compile(src, arch, true).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
            for f in src.functions {
                assert!(
                    c.ptx.contains(&format!(".entry {f}(")),
                    "sm_{arch}: kernels/{} has no entry {f}",
                    src.file
                );
            }
        }
    }
}

#[test]
fn a_broken_kernel_is_a_clear_error_with_the_compiler_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let bad = kernels::Source {
        file: "broken.cu",
        code: "extern \"C\" __global__ void k(float *x) { x[0] = undefined_name; }",
        functions: &["k"],
    };
    let e = kernels::compile(&bad, 90, true).unwrap_err().to_string();
    assert!(e.contains("kernels/broken.cu: NVRTC failed"), "{e}");
    assert!(
        e.contains("undefined_name"),
        "the log names the problem: {e}"
    );
    let warns = kernels::Source {
        file: "warns.cu",
        code: "extern \"C\" __global__ void k(float *x) { int unused = 1; x[0] = 1.0f; }",
        functions: &["k"],
    };
    match kernels::compile(&warns, 90, true) {
        Err(e) => assert!(e.to_string().contains("NVRTC warned"), "{e}"),
        // NVRTC does not warn about this one: then it must at least compile.
        Ok(c) => assert!(c.ptx.contains(".entry k(")),
    }
}

#[test]
fn compiled_kernels_are_cached_on_disk() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("gpuscale-ptx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = &SOURCES[0];
    let (first, hit) = kernels::load_or_compile(src, 90, Some(&dir)).unwrap();
    assert!(!hit, "an empty cache compiles");
    let path = kernels::cache_path(&dir, src, 90).unwrap();
    assert!(path.is_file());
    let (second, hit) = kernels::load_or_compile(src, 90, Some(&dir)).unwrap();
    assert!(hit, "the second start reads the cache");
    assert_eq!(first, second);
    // A corrupt cache entry is recompiled, not loaded.
    std::fs::write(&path, "garbage").unwrap();
    let (third, hit) = kernels::load_or_compile(src, 90, Some(&dir)).unwrap();
    assert!(!hit);
    assert_eq!(first, third);
    let _ = std::fs::remove_dir_all(&dir);
}
