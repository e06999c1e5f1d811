//! From an InferenceDeployment spec to what estimate and placement take.

use gpuscale_crds::{
    InferenceDeploymentSpec, PlacementStrategy, SharingMode, SpreadDomain as SpecSpread,
};

use super::{ReplicaId, Request, Selector, Sharing, SpreadDomain, Strategy};
use crate::estimate::{ReplicaConfig, GIB};
use crate::inventory::parse_compute_capability;

/// The replica configuration the VRAM estimate needs.
pub fn replica_config(spec: &InferenceDeploymentSpec) -> ReplicaConfig {
    let r = &spec.resources;
    ReplicaConfig {
        max_sequence_length: r.max_sequence_length.into(),
        max_batch_size: r.max_batch_size.into(),
        gpus: r.gpus_per_replica.into(),
        headroom_percent: r.vram_headroom_percent.into(),
    }
}

/// The placement request for replica `index` of `deployment` (`namespace/name`).
pub fn request(
    deployment: &str,
    index: u32,
    spec: &InferenceDeploymentSpec,
    need_per_gpu: u64,
) -> Request {
    let r = &spec.resources;
    Request {
        replica: ReplicaId {
            deployment: deployment.to_string(),
            index,
        },
        need_per_gpu,
        gpus: r.gpus_per_replica,
        sharing: match r.sharing {
            SharingMode::Exclusive => Sharing::Exclusive,
            SharingMode::Shared => Sharing::Shared,
        },
        selector: Selector {
            products: r.gpu.products.clone(),
            min_memory_bytes: r.gpu.min_memory_gib.map(|g| u64::from(g) * GIB),
            min_compute_capability: r
                .gpu
                .min_compute_capability
                .as_deref()
                .and_then(parse_compute_capability),
        },
        strategy: match spec.placement.strategy {
            PlacementStrategy::BinPack => Strategy::BinPack,
            PlacementStrategy::Spread => Strategy::Spread,
        },
        spread: match spec.placement.spread_across {
            SpecSpread::Node => SpreadDomain::Node,
            SpecSpread::Zone => SpreadDomain::Zone,
            SpecSpread::None => SpreadDomain::None,
        },
        require_nvlink: spec.placement.require_nvlink,
        avoid_nodes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuscale_crds::InferenceDeployment;

    fn example(name: &str) -> InferenceDeployment {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name);
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn the_four_gpu_example_becomes_an_nvlink_set_request() {
        let d = example("llama-70b-4gpu.yaml");
        let r = request("default/llama-70b", 2, &d.spec, 40 * GIB);
        assert_eq!(r.gpus, 4);
        assert_eq!(r.sharing, Sharing::Exclusive);
        assert!(r.require_nvlink);
        assert_eq!(r.spread, SpreadDomain::Zone);
        assert_eq!(r.selector.min_memory_bytes, Some(80 * GIB));
        assert_eq!(r.selector.min_compute_capability, Some((8, 0)));
        assert_eq!(r.replica.index, 2);
        let c = replica_config(&d.spec);
        assert_eq!(
            (
                c.max_sequence_length,
                c.max_batch_size,
                c.gpus,
                c.headroom_percent
            ),
            (8192, 32, 4, 10)
        );
    }

    #[test]
    fn the_shared_example_packs_by_vram() {
        let d = example("qwen-shared.yaml");
        let r = request("default/qwen-small", 0, &d.spec, GIB);
        assert_eq!(r.sharing, Sharing::Shared);
        assert_eq!(r.strategy, Strategy::Spread);
        assert_eq!(
            r.selector.products,
            vec!["L4".to_string(), "A10".to_string()]
        );
    }
}
