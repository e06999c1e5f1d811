//! Pod Security admission, as the built-in `PodSecurity` admission plugin enforces it
//! on pod creation: a namespace labelled `pod-security.kubernetes.io/enforce: baseline`
//! or `restricted` refuses pods that break that level, with 403 Forbidden and the
//! plugin's message (<https://kubernetes.io/docs/concepts/security/pod-security-admission/>).
//! The checks are the Pod Security Standards' controls
//! (<https://kubernetes.io/docs/concepts/security/pod-security-standards/>), all of them
//! that a Linux pod can break, at the latest version, except four that nothing here
//! sets: Windows HostProcess, AppArmor profiles, SELinux options and sysctls. A pod that
//! set those could be admitted here and refused by a cluster; no gpuscale pod does.

use serde_json::Value;

/// The level a namespace enforces, from its labels; `None` for `privileged` or none.
pub fn enforced(namespace: &Value) -> Option<&str> {
    let level = namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str()?;
    matches!(level, "baseline" | "restricted").then_some(level)
}

/// What `pod` breaks of `level` (`baseline` or `restricted`), in the plugin's words;
/// empty when it is admitted.
pub fn violations(pod: &Value, level: &str) -> Vec<String> {
    let spec = &pod["spec"];
    let containers: Vec<&Value> = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten())
        .collect();
    // The containers that break a control.
    let matching = |broken: &dyn Fn(&Value) -> bool| {
        containers
            .iter()
            .copied()
            .filter(|c| broken(c))
            .collect::<Vec<_>>()
    };
    // `container "a"` or `containers "a", "b"`, as the plugin names them.
    let which = |cs: &[&Value]| {
        let names: Vec<String> = cs
            .iter()
            .map(|c| format!("\"{}\"", c["name"].as_str().unwrap_or_default()))
            .collect();
        let noun = if cs.len() == 1 {
            "container"
        } else {
            "containers"
        };
        format!("{noun} {}", names.join(", "))
    };
    let mut out = Vec::new();

    // Baseline.
    let host: Vec<&str> = ["hostNetwork", "hostPID", "hostIPC"]
        .into_iter()
        .filter(|k| spec[*k] == true)
        .collect();
    if !host.is_empty() {
        out.push(format!(
            "host namespaces ({})",
            host.iter()
                .map(|k| format!("{k}=true"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let privileged = matching(&|c| c["securityContext"]["privileged"] == true);
    if !privileged.is_empty() {
        out.push(format!(
            "privileged ({} must not set securityContext.privileged=true)",
            which(&privileged)
        ));
    }
    const BASELINE_CAPS: [&str; 13] = [
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    ];
    let allowed_caps: &[&str] = if level == "restricted" {
        &["NET_BIND_SERVICE"]
    } else {
        &BASELINE_CAPS
    };
    let added = |c: &Value| -> Vec<String> {
        c["securityContext"]["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|cap| !allowed_caps.contains(cap))
            .map(|cap| format!("\"{cap}\""))
            .collect()
    };
    let adding = matching(&|c| !added(c).is_empty());
    if !adding.is_empty() {
        let caps: Vec<String> = adding.iter().flat_map(|c| added(c)).collect();
        out.push(format!(
            "non-default capabilities ({} must not include {} in securityContext.capabilities.add)",
            which(&adding),
            caps.join(", ")
        ));
    }
    let volumes: Vec<&Value> = spec["volumes"].as_array().into_iter().flatten().collect();
    let host_paths: Vec<String> = volumes
        .iter()
        .filter(|v| !v["hostPath"].is_null())
        .map(|v| format!("\"{}\"", v["name"].as_str().unwrap_or_default()))
        .collect();
    if !host_paths.is_empty() {
        out.push(format!(
            "hostPath {} ({})",
            if host_paths.len() == 1 {
                "volume"
            } else {
                "volumes"
            },
            host_paths.join(", ")
        ));
    }
    let host_ports: Vec<String> = containers
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter_map(|p| p["hostPort"].as_i64().filter(|p| *p != 0))
        .map(|p| p.to_string())
        .collect();
    if !host_ports.is_empty() {
        out.push(format!("hostPort ({})", host_ports.join(", ")));
    }
    let unconfined = |sc: &Value| sc["seccompProfile"]["type"] == "Unconfined";
    if unconfined(&spec["securityContext"])
        || containers.iter().any(|c| unconfined(&c["securityContext"]))
    {
        out.push(
            "seccompProfile (pod or containers must not set securityContext.seccompProfile.type to \"Unconfined\")"
                .into(),
        );
    }
    let proc_mount = matching(&|c| {
        c["securityContext"]["procMount"]
            .as_str()
            .is_some_and(|m| m != "Default")
    });
    if !proc_mount.is_empty() {
        out.push(format!(
            "procMount ({} must not set securityContext.procMount to \"Unmasked\")",
            which(&proc_mount)
        ));
    }
    if level != "restricted" {
        return out;
    }

    // Restricted.
    const VOLUME_TYPES: [&str; 8] = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    let restricted_volumes: Vec<String> = volumes
        .iter()
        .filter(|v| v["hostPath"].is_null())
        .filter(|v| {
            v.as_object().is_some_and(|o| {
                o.keys()
                    .any(|k| k != "name" && !VOLUME_TYPES.contains(&k.as_str()))
            })
        })
        .map(|v| format!("\"{}\"", v["name"].as_str().unwrap_or_default()))
        .collect();
    if !restricted_volumes.is_empty() {
        out.push(format!(
            "restricted volume types ({} must use an allowed volume type)",
            restricted_volumes.join(", ")
        ));
    }
    let escalating = matching(&|c| c["securityContext"]["allowPrivilegeEscalation"] != false);
    if !escalating.is_empty() {
        out.push(format!(
            "allowPrivilegeEscalation != false ({} must set securityContext.allowPrivilegeEscalation=false)",
            which(&escalating)
        ));
    }
    let undropped = matching(&|c| {
        !c["securityContext"]["capabilities"]["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "ALL"))
    });
    if !undropped.is_empty() {
        out.push(format!(
            "unrestricted capabilities ({} must set securityContext.capabilities.drop=[\"ALL\"])",
            which(&undropped)
        ));
    }
    let pod_sc = &spec["securityContext"];
    let root_allowed = matching(&|c| effective(c, pod_sc, "runAsNonRoot") != true);
    if !root_allowed.is_empty() {
        out.push(format!(
            "runAsNonRoot != true (pod or {} must set securityContext.runAsNonRoot=true)",
            which(&root_allowed)
        ));
    }
    let root_user = pod_sc["runAsUser"] == 0
        || containers
            .iter()
            .any(|c| c["securityContext"]["runAsUser"] == 0);
    if root_user {
        out.push("runAsUser=0 (pod and containers must not set runAsUser=0)".into());
    }
    let unprofiled = matching(&|c| {
        !matches!(
            effective(c, pod_sc, "seccompProfile")["type"].as_str(),
            Some("RuntimeDefault" | "Localhost")
        )
    });
    if !unprofiled.is_empty() {
        out.push(format!(
            "seccompProfile (pod or {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")",
            which(&unprofiled)
        ));
    }
    out
}

/// Container `c`'s own security setting `key`, else the pod's (`pod_sc`), which it
/// inherits.
fn effective<'a>(c: &'a Value, pod_sc: &'a Value, key: &str) -> &'a Value {
    let own = &c["securityContext"][key];
    if own.is_null() {
        &pod_sc[key]
    } else {
        own
    }
}

/// The plugin's refusal of pod `name` in a namespace enforcing `level`.
pub fn refusal(name: &str, level: &str, violations: &[String]) -> String {
    format!(
        "pods \"{name}\" is forbidden: violates PodSecurity \"{level}:latest\": {}",
        violations.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": spec})
    }

    #[test]
    fn a_plain_pod_passes_baseline_but_not_restricted() {
        let p = pod(json!({"containers": [{"name": "c", "image": "x"}]}));
        assert!(violations(&p, "baseline").is_empty());
        let v = violations(&p, "restricted");
        assert_eq!(v.len(), 4, "{v:?}");
        assert!(v[0].starts_with("allowPrivilegeEscalation != false (container \"c\""));
        assert!(refusal("p", "restricted", &v)
            .starts_with("pods \"p\" is forbidden: violates PodSecurity \"restricted:latest\": "));
    }

    #[test]
    fn host_paths_break_baseline_and_the_restricted_fields_pass() {
        let ok = json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "m", "persistentVolumeClaim": {"claimName": "x"}}],
        });
        assert!(violations(&pod(ok.clone()), "restricted").is_empty());
        let mut host = ok.clone();
        host["volumes"] = json!([{"name": "m", "hostPath": {"path": "/models"}}]);
        assert_eq!(
            violations(&pod(host.clone()), "baseline"),
            vec!["hostPath volume (\"m\")".to_string()]
        );
        let mut root = ok;
        root["containers"][0]["securityContext"]["runAsNonRoot"] = json!(false);
        root["hostNetwork"] = json!(true);
        let v = violations(&pod(root), "restricted");
        assert!(
            v.iter()
                .any(|m| m.starts_with("host namespaces (hostNetwork=true)")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|m| m.starts_with("runAsNonRoot != true")),
            "{v:?}"
        );
    }

    #[test]
    fn only_baseline_and_restricted_are_enforced() {
        let ns =
            |l: &str| json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": l}}});
        assert_eq!(enforced(&ns("restricted")), Some("restricted"));
        assert_eq!(enforced(&ns("baseline")), Some("baseline"));
        assert_eq!(enforced(&ns("privileged")), None);
        assert_eq!(enforced(&json!({"metadata": {}})), None);
    }
}
