//! The gpuscale operator: GPU inventory, VRAM estimates and placement (pure logic,
//! no I/O), and the node agent that publishes a node's GPUs.

pub mod autoscale;
pub mod estimate;
pub mod inventory;
pub mod node_agent;
pub mod placement;
pub mod replay;
