//! The CUDA C sources in `kernels/`, compiled by NVRTC at worker start and cached on disk
//! as PTX (keyed by source, options and NVRTC version), so a restart skips the compile.
//! Needs only `libnvrtc.so.12`, not a GPU: CI compiles every file with it.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::result as nvrtc;

/// Prepended to every kernel file: half conversions, reductions, ggml block layouts.
pub const COMMON: &str = include_str!("../../../../kernels/common.cuh");

/// One kernel file and the functions the backend loads from it.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// File name under `kernels/`.
    pub file: &'static str,
    /// Its text.
    pub code: &'static str,
    /// The `extern "C"` kernels it defines.
    pub functions: &'static [&'static str],
}

/// Every kernel file.
pub const SOURCES: &[Source] = &[
    Source {
        file: "matmul.cu",
        code: include_str!("../../../../kernels/matmul.cu"),
        functions: &[
            "quantize_q8",
            "mul_mat_q4_0",
            "mul_mat_q4_1",
            "mul_mat_q8_0",
            "mul_mat_f16",
            "mul_mat_f32",
            "dequant_f16",
            "to_f16",
        ],
    },
    Source {
        file: "norm.cu",
        code: include_str!("../../../../kernels/norm.cu"),
        functions: &["rmsnorm", "add_inplace", "add_bias"],
    },
    Source {
        file: "rope.cu",
        code: include_str!("../../../../kernels/rope.cu"),
        functions: &["rope"],
    },
    Source {
        file: "mlp.cu",
        code: include_str!("../../../../kernels/mlp.cu"),
        functions: &["silu_mul"],
    },
    Source {
        file: "embed.cu",
        code: include_str!("../../../../kernels/embed.cu"),
        functions: &["embed", "gather_rows"],
    },
    Source {
        file: "attention.cu",
        code: include_str!("../../../../kernels/attention.cu"),
        functions: &["store_kv", "attention"],
    },
    Source {
        file: "sample.cu",
        code: include_str!("../../../../kernels/sample.cu"),
        functions: &["argmax", "sample_top_p"],
    },
];

/// Why kernels could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// libnvrtc could not be loaded.
    #[error("NVRTC (libnvrtc.so.12) was not found; put its folder on LD_LIBRARY_PATH (pip install nvidia-cuda-nvrtc-cu12 ships it)")]
    NvrtcMissing,
    /// The compiler rejected a file, or warned when warnings are errors.
    #[error("kernels/{file}: NVRTC {what}:\n{log}")]
    Compile {
        /// The kernel file.
        file: &'static str,
        /// "failed" or "warned".
        what: &'static str,
        /// The compiler's log.
        log: String,
    },
    /// An NVRTC call failed.
    #[error("kernels/{file}: NVRTC call failed: {error:?}")]
    Nvrtc {
        /// The kernel file.
        file: &'static str,
        /// The error.
        error: nvrtc::NvrtcError,
    },
}

/// Whether libnvrtc can be loaded (cudarc panics on first use when it cannot).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, e.g. (12, 9).
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    if !nvrtc_present() {
        return Err(KernelError::NvrtcMissing);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|error| KernelError::Nvrtc { file: "-", error })?;
    Ok((major, minor))
}

/// Compiler options for a device of compute capability `arch` (e.g. 90 for H100).
pub fn options(arch: u32) -> Vec<String> {
    vec![
        format!("--gpu-architecture=compute_{arch}"),
        "--std=c++17".into(),
        // Exact f32 division and square root: the CPU reference rounds the same way.
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
    ]
}

/// A compiled file: its PTX and the compiler's (warning) log.
#[derive(Debug)]
pub struct Compiled {
    /// PTX text.
    pub ptx: String,
    /// What NVRTC printed (warnings), empty when clean.
    pub log: String,
}

/// Compiles one file to PTX. With `warnings_are_errors`, a non-empty log fails it.
pub fn compile(
    src: &Source,
    arch: u32,
    warnings_are_errors: bool,
) -> Result<Compiled, KernelError> {
    if !nvrtc_present() {
        return Err(KernelError::NvrtcMissing);
    }
    let file = src.file;
    let fail = |error| KernelError::Nvrtc { file, error };
    let text = CString::new(format!("{COMMON}\n#line 1 \"{file}\"\n{}", src.code))
        .expect("kernel sources hold no NUL");
    let name = CString::new(file).expect("file names hold no NUL");
    let prog = nvrtc::create_program(&text, Some(&name)).map_err(fail)?;
    // SAFETY: `prog` was just created and is destroyed once, below.
    let outcome = unsafe {
        let compiled = nvrtc::compile_program(prog, &options(arch));
        let log = nvrtc::get_program_log(prog)
            .map(|l| c_text(&l))
            .unwrap_or_default();
        let ptx = match compiled {
            Ok(()) => nvrtc::get_ptx(prog).map(|p| c_text(&p)).map_err(fail),
            Err(_) => Err(KernelError::Compile {
                file,
                what: "failed",
                log: log.clone(),
            }),
        };
        let _ = nvrtc::destroy_program(prog);
        ptx.map(|ptx| Compiled { ptx, log })
    }?;
    if warnings_are_errors && !outcome.log.trim().is_empty() {
        return Err(KernelError::Compile {
            file,
            what: "warned",
            log: outcome.log,
        });
    }
    Ok(outcome)
}

fn c_text(bytes: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = bytes.iter().map(|c| *c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

/// FNV-1a: a stable key for the disk cache (std's hasher may change between releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Where a file's PTX is cached for `arch` under `dir`.
pub fn cache_path(dir: &Path, src: &Source, arch: u32) -> Result<PathBuf, KernelError> {
    let (major, minor) = nvrtc_version()?;
    let opts = options(arch).join(" ");
    let key = fnv1a(&[
        COMMON.as_bytes(),
        src.code.as_bytes(),
        opts.as_bytes(),
        format!("{major}.{minor}").as_bytes(),
    ]);
    let stem = src.file.trim_end_matches(".cu");
    Ok(dir.join(format!("{stem}-sm{arch}-{key:016x}.ptx")))
}

/// The PTX of `src`, from `cache_dir` when compiled before, else compiled and stored
/// there. Returns the PTX and whether it came from the cache. A cache that cannot be
/// written is only logged: the compile result is still good.
pub fn load_or_compile(
    src: &Source,
    arch: u32,
    cache_dir: Option<&Path>,
) -> Result<(String, bool), KernelError> {
    let path = match cache_dir {
        Some(dir) => Some(cache_path(dir, src, arch)?),
        None => None,
    };
    if let Some(p) = &path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            if ptx.contains(".entry") {
                return Ok((ptx, true));
            }
        }
    }
    let c = compile(src, arch, false)?;
    if !c.log.trim().is_empty() {
        tracing::warn!(file = src.file, log = %c.log, "NVRTC warnings");
    }
    if let Some(p) = &path {
        // Written beside, then renamed: a concurrent start never reads half a file.
        let tmp = p.with_extension(format!("ptx.{}", std::process::id()));
        let stored = p
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::write(&tmp, &c.ptx))
            .and_then(|_| std::fs::rename(&tmp, p));
        if let Err(e) = stored {
            tracing::warn!(path = %p.display(), error = %e, "could not cache compiled kernels");
        }
    }
    Ok((c.ptx, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_the_source_and_options() {
        let a = fnv1a(&[b"x", b"y"]);
        assert_ne!(a, fnv1a(&[b"xy"]), "parts are delimited");
        assert_ne!(a, fnv1a(&[b"x", b"z"]));
        assert_eq!(a, fnv1a(&[b"x", b"y"]));
        assert_ne!(options(80), options(90));
    }

    #[test]
    fn every_listed_function_is_defined_in_its_file() {
        for s in SOURCES {
            for f in s.functions {
                assert!(
                    s.code.contains(&format!("void {f}(")),
                    "{} does not define {f}",
                    s.file
                );
            }
        }
    }
}
