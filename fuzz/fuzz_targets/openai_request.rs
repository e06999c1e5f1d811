//! The worker's OpenAI routes on arbitrary request bodies, through the real router
//! (body limit, JSON parsing, validation, error shaping), before a model is loaded:
//! every answer is an OpenAI-shaped error or a 503, never a panic.
#![no_main]
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use inference_worker::http::{router, AppState};
use inference_worker::metrics::Metrics;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let path = if selector % 2 == 0 {
        "/v1/completions"
    } else {
        "/v1/chat/completions"
    };
    let state = Arc::new(AppState::new(Arc::new(Metrics::new()), "m".into()));
    let app = router(state);
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .unwrap();
    let resp = runtime().block_on(app.oneshot(req)).unwrap();
    let status = resp.status().as_u16();
    assert!(matches!(status, 400 | 413 | 503), "{status}");
    let bytes = runtime()
        .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON error body");
    assert!(v["error"]["message"].is_string(), "{v}");
});
