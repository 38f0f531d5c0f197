//! Which cgroup backend this host offers: the cgroup mounts (mountinfo), the daemon's own v2 cgroup, and the choice `auto` makes, with its fallback.

use std::path::{Path, PathBuf};

use super::{Backend, CgroupError, CgroupMode, CgroupsConfig, v1, v2};

/// The controllers every session needs.
const NEEDED: [&str; 3] = ["memory", "cpu", "pids"];

/// Where the OS keeps what detection reads; parameters so tests can fake them.
#[derive(Debug, Clone)]
pub struct OsRoots {
    pub mountinfo: PathBuf,
    pub self_cgroup: PathBuf,
}

impl Default for OsRoots {
    fn default() -> Self {
        OsRoots {
            mountinfo: "/proc/self/mountinfo".into(),
            self_cgroup: "/proc/self/cgroup".into(),
        }
    }
}

/// The cgroup mounts of this host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mounts {
    /// A cgroup2 mount (the whole tree on pure v2; `unified` on a hybrid host).
    pub cgroup2: Option<PathBuf>,
    /// v1 controller name → mount point.
    pub v1: Vec<(String, PathBuf)>,
}

impl Mounts {
    /// Parses /proc/self/mountinfo: `… mountpoint … - fstype source superopts`.
    pub fn parse(mountinfo: &str) -> Mounts {
        let mut m = Mounts::default();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(point) = left.split_whitespace().nth(4) else {
                continue;
            };
            let mut r = right.split_whitespace();
            let (fstype, _source, opts) = (r.next(), r.next(), r.next().unwrap_or(""));
            match fstype {
                Some("cgroup2") => {
                    m.cgroup2.get_or_insert_with(|| PathBuf::from(point));
                }
                Some("cgroup") => {
                    for opt in opts.split(',') {
                        if matches!(opt, "memory" | "cpu" | "pids" | "freezer") {
                            m.v1.push((opt.to_string(), PathBuf::from(point)));
                        }
                    }
                }
                _ => {}
            }
        }
        m
    }

    fn v1_mount(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, p)| p.as_path())
    }
}

/// The backend for `config.mode`. `Ok(None)`: cgroups off (asked, or
/// `auto` found nothing usable — logged once). An explicit mode that cannot
/// work is an error. `auto` prefers v2 when the cgroup2 mount has the needed
/// controllers delegated to us (available in our own cgroup), else v1 when
/// its controllers are mounted; when the first cannot be set up, it tries the
/// other and logs why.
pub fn backend(
    config: &CgroupsConfig,
    roots: &OsRoots,
) -> Result<Option<Box<dyn Backend>>, CgroupError> {
    let mounts = Mounts::parse(&std::fs::read_to_string(&roots.mountinfo).unwrap_or_default());
    let own = own_v2_cgroup(&roots.self_cgroup);
    let attempt = |want| setup(want, &mounts, own.as_deref(), &config.parent);
    let (first, second) = match config.mode {
        CgroupMode::Off => return Ok(None),
        CgroupMode::V1 | CgroupMode::V2 => return attempt(config.mode).map(Some),
        CgroupMode::Auto if v2_delegated(&mounts, own.as_deref()) => {
            (CgroupMode::V2, CgroupMode::V1)
        }
        CgroupMode::Auto => (CgroupMode::V1, CgroupMode::V2),
    };
    let first_error = match attempt(first) {
        Ok(b) => return Ok(Some(b)),
        Err(e) => e,
    };
    match attempt(second) {
        Ok(b) => {
            tracing::warn!(error = %first_error, "cgroups: {first:?} cannot be used; using {second:?}");
            Ok(Some(b))
        }
        Err(e) => {
            tracing::warn!(error = %first_error, fallback_error = %e, "cgroups unavailable; running without the kernel isolation layer (mode = off)");
            Ok(None)
        }
    }
}

/// Whether the cgroup2 mount offers the needed controllers to our own cgroup
/// (on a hybrid host the unified mount has none: they are bound to v1).
fn v2_delegated(mounts: &Mounts, own: Option<&Path>) -> bool {
    let (Some(mount), Some(own)) = (&mounts.cgroup2, own) else {
        return false;
    };
    let own_dir = mount.join(own.strip_prefix("/").unwrap_or(own));
    let controllers =
        std::fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
    NEEDED
        .iter()
        .all(|c| controllers.split_whitespace().any(|x| x == *c))
}

/// Sets up the backend `want` (V1 or V2) under `parent`.
fn setup(
    want: CgroupMode,
    mounts: &Mounts,
    own: Option<&Path>,
    parent: &str,
) -> Result<Box<dyn Backend>, CgroupError> {
    let unusable = |why: String| CgroupError::Unusable { mode: want, why };
    match want {
        CgroupMode::V2 => {
            let mount = mounts
                .cgroup2
                .clone()
                .ok_or_else(|| unusable("no cgroup2 mount".into()))?;
            let controllers =
                std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
            for c in NEEDED {
                if !controllers.split_whitespace().any(|x| x == c) {
                    return Err(unusable(format!(
                        "the {c} controller is not available in {}",
                        mount.display()
                    )));
                }
            }
            let own = own.ok_or_else(|| unusable("no v2 entry in /proc/self/cgroup".into()))?;
            Ok(Box::new(v2::V2::setup(
                &mount,
                own,
                parent,
                std::process::id(),
            )?))
        }
        CgroupMode::V1 => {
            let need = |c: &str| {
                mounts
                    .v1_mount(c)
                    .map(Path::to_path_buf)
                    .ok_or_else(|| unusable(format!("no v1 {c} hierarchy mounted")))
            };
            let (memory, cpu, pids) = (need("memory")?, need("cpu")?, need("pids")?);
            Ok(Box::new(v1::V1::setup(
                &memory,
                &cpu,
                &pids,
                mounts.v1_mount("freezer"),
                mounts.cgroup2.as_deref(),
                parent,
            )?))
        }
        CgroupMode::Auto | CgroupMode::Off => unreachable!("a backend is V1 or V2"),
    }
}

/// The daemon's own cgroup in the v2 hierarchy, from `/proc/self/cgroup` (`0::/path`).
fn own_v2_cgroup(self_cgroup: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(self_cgroup).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_of_a_hybrid_host() {
        let m = Mounts::parse(HYBRID);
        assert_eq!(
            m.cgroup2.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            m.v1_mount("memory"),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(m.v1_mount("cpu"), Some(Path::new("/sys/fs/cgroup/cpu")));
        assert_eq!(m.v1_mount("pids"), Some(Path::new("/sys/fs/cgroup/pids")));
    }

    #[test]
    fn mountinfo_of_a_pure_v2_host() {
        let m =
            Mounts::parse("25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n");
        assert_eq!(m.cgroup2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert!(m.v1.is_empty());
    }

    /// A fake host under `root`: v1 memory, cpu, pids and freezer mounts when
    /// `v1`, and a cgroup2 mount whose root offers `root_controllers` and in
    /// which the daemon's own cgroup `/svc` offers `own_controllers` and holds
    /// `own_procs`.
    fn fake_host(
        root: &Path,
        v1: bool,
        root_controllers: &str,
        own_controllers: &str,
        own_procs: &str,
    ) -> OsRoots {
        let mut mountinfo = String::new();
        if v1 {
            for c in ["memory", "cpu", "pids", "freezer"] {
                let dir = root.join(c);
                std::fs::create_dir_all(&dir).unwrap();
                mountinfo.push_str(&format!(
                    "3{} 31 0:3 / {} rw - cgroup cgroup rw,{c}\n",
                    c.len(),
                    dir.display()
                ));
            }
        }
        let unified = root.join("unified");
        std::fs::create_dir_all(unified.join("svc")).unwrap();
        std::fs::write(unified.join("cgroup.controllers"), root_controllers).unwrap();
        std::fs::write(unified.join("svc/cgroup.controllers"), own_controllers).unwrap();
        std::fs::write(unified.join("svc/cgroup.procs"), own_procs).unwrap();
        mountinfo.push_str(&format!(
            "41 31 0:38 / {} rw - cgroup2 cgroup2 rw\n",
            unified.display()
        ));
        std::fs::write(root.join("mountinfo"), mountinfo).unwrap();
        std::fs::write(root.join("self-cgroup"), "0::/svc\n").unwrap();
        OsRoots {
            mountinfo: root.join("mountinfo"),
            self_cgroup: root.join("self-cgroup"),
        }
    }

    fn chosen(roots: &OsRoots) -> Option<&'static str> {
        backend(&CgroupsConfig::default(), roots)
            .unwrap()
            .map(|b| b.name())
    }

    fn me() -> String {
        format!("{}\n", std::process::id())
    }

    #[test]
    fn auto_prefers_v2_when_its_controllers_are_delegated_even_with_v1_mounted() {
        let root = tempfile::tempdir().unwrap();
        let roots = fake_host(
            root.path(),
            true,
            "cpu memory pids",
            "cpu memory pids",
            &me(),
        );
        assert_eq!(chosen(&roots), Some("v2"));
    }

    #[test]
    fn auto_takes_v1_on_a_hybrid_host_whose_cgroup2_has_no_controllers() {
        let root = tempfile::tempdir().unwrap();
        let roots = fake_host(root.path(), true, "", "", &me());
        assert_eq!(chosen(&roots), Some("v1"));
        assert!(root.path().join("memory/sessiond").is_dir());
    }

    #[test]
    fn auto_falls_back_to_v1_when_v2_cannot_be_set_up() {
        let root = tempfile::tempdir().unwrap();
        // Delegated controllers, but our cgroup is shared: v2 refuses.
        let roots = fake_host(
            root.path(),
            true,
            "cpu memory pids",
            "cpu memory pids",
            &format!("{}1\n", me()),
        );
        assert_eq!(chosen(&roots), Some("v1"));
    }

    #[test]
    fn auto_is_off_when_neither_works_and_an_explicit_mode_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let roots = fake_host(root.path(), false, "", "", &me());
        assert_eq!(chosen(&roots), None);
        let v1 = CgroupsConfig {
            mode: CgroupMode::V1,
            ..Default::default()
        };
        assert!(matches!(
            backend(&v1, &roots),
            Err(CgroupError::Unusable {
                mode: CgroupMode::V1,
                ..
            })
        ));
    }
}
