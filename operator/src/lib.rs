//! The gpuscale operator: GPU inventory, VRAM estimates, placement and the autoscaling
//! policy (pure logic, no I/O); the reconcile loop, worker scraping and metrics around
//! them; the node agent that publishes a node's GPUs; and trace replay.

pub mod autoscale;
pub mod cost;
pub mod estimate;
pub mod health;
pub mod inventory;
pub mod leader;
pub mod metrics;
pub mod model_header;
pub mod node_agent;
pub mod placement;
pub mod pod_resources;
pub mod reconcile;
pub mod replay;
pub mod rollout;
pub mod routers;
pub mod scrape;
