//! Act: the API writes a pass decided (pods created, drained, deleted; the Service
//! applied), and the drain of every replica when a deployment is deleted.

use gpuscale_crds::InferenceDeployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use tracing::info;

use super::decide::{Decided, Todo};
use super::observe::observe;
use super::observe::World;
use super::pods::*;
use super::report::publish;
use super::{
    key_of, plan, Context, Error, PodFacts, Replica, SeenPod, Step, Targets, Version, FIELD_MANAGER,
};

/// Act: the decided API steps, in order, then the Service. Returns the replicas created
/// and the first error (the steps after it are left for the next pass).
pub(super) async fn act(
    d: &InferenceDeployment,
    ctx: &Context,
    world: &World,
    decided: &Decided,
    wall: jiff::Timestamp,
) -> (Vec<(u32, PodPlacement)>, Result<(), Error>) {
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut created = Vec::new();
    // Record what the device plugin assigned, so every later ledger starts from it.
    for (pod, p) in &world.corrections {
        let patched = pods_api
            .patch(
                pod,
                &PatchParams::default(),
                &Patch::Merge(&placement_patch(p)),
            )
            .await;
        match patched {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return (created, Err(e.into())),
        }
    }
    // Claims of DRA replicas whose creation was cut short between pod and claim.
    for (pod, p) in &world.missing_claims {
        if let Err(e) = create_claim(ctx, &**pod, p).await {
            return (created, Err(e.into()));
        }
    }
    for step in &decided.todo {
        let result: Result<(), kube::Error> = match step {
            Todo::Create(index, p, version) => {
                let Some(pod) = replica_pod(decided.view(*version), *index, p, &ctx.config) else {
                    continue; // unmountable sources were refused before
                };
                match pods_api.create(&PostParams::default(), &pod).await {
                    Ok(made) => {
                        info!(pod = %pod.name_any(), node = %p.node, gpus = ?p.gpus, "created replica");
                        let claimed = create_claim(ctx, &made, p).await;
                        ctx.cache.expect_created(made);
                        created.push((*index, p.clone()));
                        claimed
                    }
                    // Someone (a stale pass, another operator) already made it.
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                    // Refused by admission (Pod Security, a quota, a policy): said on
                    // the deployment as the ReplicaSet controller says it, since the
                    // pass's error alone reaches only the operator's log.
                    Err(kube::Error::Api(e)) if matches!(e.code, 403 | 422) => {
                        let note = format!("creating {}: {}", pod.name_any(), e.message);
                        publish(ctx, d, EventType::Warning, "FailedCreate", "Create", &note).await;
                        Err(kube::Error::Api(e))
                    }
                    Err(e) => Err(e),
                }
            }
            Todo::Drain(seen) => drain_pod(&pods_api, seen, wall).await.map(|drained| {
                if drained {
                    info!(pod = %seen.name_any(), "draining replica");
                }
            }),
            Todo::Delete(seen, why) => {
                let pod = seen.name_any();
                if let Some(why) = why {
                    let note = format!("replica {pod} failed: {why}; replacing it");
                    publish(
                        ctx,
                        d,
                        EventType::Warning,
                        "ReplicaFailed",
                        "Replace",
                        &note,
                    )
                    .await;
                }
                delete_pod(ctx, &pods_api, seen, DeleteParams::default())
                    .await
                    .map(|deleted| {
                        if deleted {
                            info!(%pod, "deleted replica");
                        }
                    })
            }
        };
        if let Err(e) = result {
            return (created, Err(e.into()));
        }
    }
    if let Err(e) = ask_for_capacity(d, ctx, &pods_api, &decided.capacity).await {
        return (created, Err(e.into()));
    }
    let svc = service(d);
    // Applied when missing or different, not every pass: a steady deployment costs the
    // API no write.
    if ctx
        .cache
        .service(&ns, &name)
        .is_some_and(|have| service_matches(&have, &svc))
    {
        return (created, Ok(()));
    }
    let applied = Api::<k8s_openapi::api::core::v1::Service>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&svc),
        )
        .await;
    (created, applied.map(|_| ()).map_err(Error::from))
}

/// Keeps one capacity request pod (see [`capacity_pod`]) for each replica in `wanted`
/// (index, whole GPUs) and none for any other: created when missing (with an Event),
/// deleted once its replica is placed or no longer wanted.
async fn ask_for_capacity(
    d: &InferenceDeployment,
    ctx: &Context,
    pods_api: &Api<Pod>,
    wanted: &[(u32, u32)],
) -> Result<(), kube::Error> {
    let name = d.name_any();
    let have: Vec<_> = ctx
        .cache
        .owned(&d.uid().unwrap_or_default())
        .into_iter()
        .filter(|p| p.labels().contains_key(LABEL_CAPACITY_FOR))
        .collect();
    // A request that ended (bound to a node that came, which still did not take the
    // replica) is made again, naming the nodes there are now.
    let ended = |p: &SeenPod| matches!(p.facts().phase, Some("Succeeded" | "Failed"));
    for pod in &have {
        let still =
            !ended(pod) && capacity_index(pod).is_some_and(|i| wanted.iter().any(|(w, _)| *w == i));
        if !still
            && pod.deletion_timestamp().is_none()
            && delete_pod(ctx, pods_api, pod, DeleteParams::default()).await?
        {
            info!(pod = %pod.name_any(), "deleted capacity request");
        }
    }
    let missing = wanted
        .iter()
        .filter(|(index, _)| {
            let pod_name = capacity_pod_name(&name, *index);
            !have.iter().any(|p| p.name_any() == pod_name)
        })
        .collect::<Vec<_>>();
    if missing.is_empty() {
        return Ok(());
    }
    // The nodes there are, which a request must not land on.
    let existing: Vec<String> = ctx
        .cache
        .nodes()
        .iter()
        .map(|n| {
            n.labels()
                .get("kubernetes.io/hostname")
                .cloned()
                .unwrap_or_else(|| n.name_any())
        })
        .collect();
    for (index, gpus) in missing {
        let pod_name = capacity_pod_name(&name, *index);
        let pod = capacity_pod(d, *index, *gpus, existing.clone(), &ctx.config);
        match pods_api.create(&PostParams::default(), &pod).await {
            Ok(_) => {
                let note = format!(
                    "replica {index} fits on no node: {pod_name} asks a cluster autoscaler \
                     for a node with {gpus} nvidia.com/gpu; the replica is placed when its \
                     GPUs appear"
                );
                info!(pod = %pod_name, gpus, "created capacity request");
                publish(
                    ctx,
                    d,
                    EventType::Normal,
                    "CapacityRequested",
                    "Place",
                    &note,
                )
                .await;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates the ResourceClaim of a DRA replica (nothing for other placements). The
/// scheduler holds the pod until it exists.
async fn create_claim(
    ctx: &Context,
    pod: &impl PodFacts,
    p: &PodPlacement,
) -> Result<(), kube::Error> {
    if !p.dra || p.gpus.is_empty() {
        return Ok(());
    }
    let Some(claim) = replica_claim(pod, p, &ctx.config) else {
        return Ok(());
    };
    let api: Api<ResourceClaim> =
        Api::namespaced(ctx.client.clone(), pod.pod_namespace().unwrap_or_default());
    match api.create(&PostParams::default(), &claim).await {
        Ok(_) => {
            info!(claim = %claim.name_any(), uuids = ?p.uuids, "created resource claim");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes `pod` with `params` (`false`: it was gone already) and forgets its
/// expectation: a pod deleted before the store showed it never shows, and its
/// expectation would count a replica that is gone until it expired (a phantom the plan
/// balances by deleting a real one, and that holds a deployment's deletion open).
///
/// Only that pod: its UID is the delete's precondition, as the kubelet's own deletes
/// and the pod garbage collector's are. Replica names repeat (`<deployment>-<index>`),
/// so a delete by name from a pass whose view is stale would remove the replica made
/// again in the pod's place; the API answers 409 instead, which means the pod this
/// pass saw is gone.
pub(super) async fn delete_pod(
    ctx: &Context,
    api: &Api<Pod>,
    pod: &SeenPod,
    params: DeleteParams,
) -> Result<bool, kube::Error> {
    let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..params
    };
    let deleted = match api.delete(&name, &params).await {
        Ok(_) => true,
        Err(e) if gone(&e) => false,
        Err(e) => return Err(e),
    };
    ctx.cache.forget_created(&ns, &name);
    Ok(deleted)
}

/// Starts `pod`'s drain (`false`: it is gone, or another pod has its name now).
async fn drain_pod(
    api: &Api<Pod>,
    pod: &SeenPod,
    now: jiff::Timestamp,
) -> Result<bool, kube::Error> {
    let patch = drain_patch(pod, now);
    match api
        .patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if gone(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the API's answer to a write that named a pod's UID says that pod is gone:
/// not found, or another pod has its name now (the UID precondition failed, 409).
fn gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(e) if e.code == 404
        || (e.code == 409 && e.message.contains("Precondition failed")))
}

/// On deletion: drain every replica, delete each once it is empty, then let the
/// finalizer go (the owner references then collect the Service, and any capacity
/// request or model probe pod). The replicas go by the plan's own rule, as a plan
/// towards no replica: a ready replica is drained, a loading or failed one deleted,
/// a drained one deleted once out of every endpoint list and empty, or timed out.
pub(super) async fn cleanup(d: &InferenceDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = d.namespace().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let slot = ctx.slot(d);
    let mut state = slot.lock().await;
    let (now, wall) = ctx.clock.now();
    let mut world = Box::pin(observe(d, ctx, &mut state, now, wall)).await;
    // In index order, so that the API sees the same steps in the same order each pass.
    world.seen.sort_by_key(|s| s.index);
    let replicas: Vec<Replica> = world
        .seen
        .iter()
        .map(|s| s.replica(Version::Stable))
        .collect();
    let pod_of = |i: u32| world.seen.iter().find(|s| s.index == i).map(|s| &s.pod);
    for step in plan(&replicas, &Targets::stable(0, 0)) {
        match step {
            Step::Drain(i) => {
                if let Some(pod) = pod_of(i) {
                    drain_pod(&pods_api, pod, wall).await?;
                }
            }
            Step::Delete(i) => {
                if let Some(pod) = pod_of(i) {
                    delete_pod(ctx, &pods_api, pod, DeleteParams::default()).await?;
                }
            }
            // A plan towards no replica creates none.
            Step::Create(..) => {}
        }
    }
    if !world.seen.is_empty() {
        return Err(Error::Draining(world.seen.len()));
    }
    let key = key_of(d);
    if let Some(uid) = d.uid() {
        ctx.state.lock().expect("state lock").remove(&uid);
    }
    ctx.metrics.forget(&key);
    info!(deployment = %key, "all replicas drained; releasing");
    Ok(Action::await_change())
}
