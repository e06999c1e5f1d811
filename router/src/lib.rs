//! gpuscale's request router: one OpenAI-compatible endpoint for every model the cluster
//! serves. It routes by the request's `model` to the InferenceDeployment serving it,
//! picks a replica by outstanding work and prefix affinity (bounded load), holds
//! requests while no replica can take them (scale from zero, saturation), and relays
//! answers as they stream.
//!
//! | file | concern |
//! | --- | --- |
//! | `table.rs` | which deployment and replicas serve a model (pure) |
//! | `prefix.rs` | prompt block hashes and which replica was sent which |
//! | `pick.rs` | the choice of replica (pure) |
//! | `route.rs` | shared state, holding, per-replica accounting |
//! | `proxy.rs` | the HTTP API and the relay |
//! | `discovery.rs` | kube-rs watches and worker scrapes that feed the table |
//! | `metrics.rs` | `gpuscale_router_*` |

pub mod discovery;
pub mod metrics;
pub mod pick;
pub mod prefix;
pub mod proxy;
pub mod route;
pub mod table;

pub use route::{HoldConfig, Router};
