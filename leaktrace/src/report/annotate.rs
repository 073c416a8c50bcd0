//! Names applied to a finished report, not to events: the namespace, pod and container
//! names of the rows whose cgroup named a pod (see [`crate::targets::pods`]), as the Parca
//! agent attaches its metadata when it writes a profile. One lookup per row of a report.
use crate::{
    report::model::{OomKill, Owner, Report},
    targets::pods::PodName,
};

/// Fills in `namespace`, `pod` and `container_name` of every row, tier-2 entry and OOM kill
/// that has a pod uid, with what `lookup(pod_uid, container_id)` answers. Rows without a pod
/// uid are not looked up.
pub fn name_pods(
    report: &mut Report,
    lookup: &mut dyn FnMut(&str, Option<&str>) -> Option<PodName>,
) {
    let mut name = |owner: &mut Owner| {
        let Some(uid) = owner.pod_uid.as_deref() else {
            return;
        };
        if let Some(n) = lookup(uid, owner.container_id.as_deref()) {
            owner.namespace = Some(n.namespace);
            owner.pod = Some(n.pod);
            owner.container_name = n.container;
        }
    };
    for row in report
        .leaks
        .iter_mut()
        .chain(&mut report.runtime)
        .chain(&mut report.growth)
    {
        name(&mut row.owner);
    }
    for row in &mut report.fd_leaks {
        name(&mut row.owner);
    }
    for row in &mut report.tmp_leaks {
        name(&mut row.owner);
    }
    for t in &mut report.tier2 {
        name(&mut t.owner);
    }
    for k in &mut report.oom_kills {
        name_oom_kill(k, lookup);
    }
}

/// Fills in `namespace`, `pod` and `container_name` of an OOM kill with a pod uid (see
/// [`name_pods`]).
pub fn name_oom_kill(
    kill: &mut OomKill,
    lookup: &mut dyn FnMut(&str, Option<&str>) -> Option<PodName>,
) {
    let Some(uid) = kill.pod_uid.as_deref() else {
        return;
    };
    if let Some(n) = lookup(uid, kill.container_id.as_deref()) {
        kill.namespace = Some(n.namespace);
        kill.pod = Some(n.pod);
        kill.container_name = n.container;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::golden::sample;

    #[test]
    fn rows_with_a_pod_uid_are_named_and_others_are_not_looked_up() {
        let mut r = sample();
        r.leaks[0].owner.pod_uid = Some("uid-a".into());
        r.leaks[0].owner.container_id = Some("c1".into());
        r.fd_leaks[0].owner.pod_uid = Some("uid-a".into());
        r.tmp_leaks[0].owner.pod_uid = Some("uid-gone".into());
        r.oom_kills[0].pod_uid = Some("uid-a".into());
        r.oom_kills[0].container_id = Some("c1".into());
        let mut asked = Vec::new();
        name_pods(&mut r, &mut |uid, id| {
            asked.push((uid.to_owned(), id.map(str::to_owned)));
            (uid == "uid-a").then(|| PodName {
                namespace: "payments".into(),
                pod: "api-7f9c".into(),
                container: id.map(|_| "api".to_owned()),
            })
        });
        assert_eq!(asked.len(), 4, "{asked:?}");
        let o = &r.leaks[0].owner;
        assert_eq!(
            (o.namespace.as_deref(), o.pod.as_deref()),
            (Some("payments"), Some("api-7f9c"))
        );
        assert_eq!(o.container_name.as_deref(), Some("api"));
        // In the pod, no container id: the pod without a container name.
        let o = &r.fd_leaks[0].owner;
        assert_eq!(o.pod.as_deref(), Some("api-7f9c"));
        assert_eq!(o.container_name, None);
        // A pod the node does not name, and rows in no pod: nothing.
        assert_eq!(r.tmp_leaks[0].owner.pod, None);
        assert_eq!(r.leaks[1].owner.namespace, None);
        let k = &r.oom_kills[0];
        assert_eq!(
            (k.namespace.as_deref(), k.pod.as_deref()),
            (Some("payments"), Some("api-7f9c"))
        );
        assert_eq!(k.container_name.as_deref(), Some("api"));
    }
}
