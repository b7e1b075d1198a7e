//! `hpcvm doctor`: a preflight report on whether this host can run what is asked (KVM,
//! hugepages, IOMMU, passthrough devices, memlock), one line per check with its fix.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::Path;

use crate::config::{HugePageSize, MemoryConfig};
use crate::memory::{HugePagePool, MemoryError};
use crate::vfio::host::{
    self, HostDevice, HostError, HostPaths, Memlock, PassthroughAccess, IOMMU_FIX,
};

/// What `hpcvm doctor` is asked to check beyond the basics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// `--device` specs (BDF or sysfs path).
    pub devices: Vec<String>,
    /// `--memory`, parsed.
    pub memory: Option<MemoryConfig>,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Works.
    Ok,
    /// Works, with a caveat.
    Warn,
    /// Something asked for cannot work.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The verdict.
    pub status: Status,
    /// What was checked (`kvm`, `hugepages 2M`, `device 3b:00.2`).
    pub name: String,
    /// What was found.
    pub finding: String,
    /// What to do, for warn and FAIL.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: impl Into<String>, finding: impl Into<String>) -> Self {
        Self::new(Status::Ok, name, finding, None)
    }

    fn new(
        status: Status,
        name: impl Into<String>,
        finding: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Self {
            status,
            name: name.into(),
            finding: finding.into(),
            fix,
        }
    }

    fn from_error(status: Status, name: impl Into<String>, e: &HostError) -> Self {
        Self::new(status, name, e.problem(), Some(e.fix()))
    }
}

/// Whether `hpcvm run` can share directories (`--share`, the job's working
/// directory): virtiofsd at `found`, or a warning with how to install it.
pub fn virtiofsd(found: Option<std::path::PathBuf>) -> Check {
    match found {
        Some(p) => Check::ok(
            "virtiofsd",
            format!("{} (for --share and the job's cwd)", p.display()),
        ),
        None => Check::new(
            Status::Warn,
            "virtiofsd",
            "not installed: jobs cannot share directories (--share, the working directory)",
            Some(
                "apt-get install libseccomp-dev libcap-ng-dev && cargo install virtiofsd \
                 (or make deps), or run jobs with --no-share-cwd"
                    .into(),
            ),
        ),
    }
}

/// Runs every check for `request` on the host at `paths`.
pub fn checks(paths: &HostPaths, request: &Request) -> Vec<Check> {
    checks_with(paths, request, Memlock::read(paths))
}

fn checks_with(
    paths: &HostPaths,
    request: &Request,
    memlock: Result<Memlock, HostError>,
) -> Vec<Check> {
    let mut out = kvm(paths);
    out.extend(hugepages(paths, request.memory));
    let passthrough = !request.devices.is_empty();
    let needed = if passthrough {
        Status::Fail
    } else {
        Status::Warn
    };
    let groups =
        std::fs::read_dir(paths.sys.join("kernel/iommu_groups")).map_or(0, Iterator::count);
    out.push(if host::iommu_enabled(paths) {
        Check::ok("iommu", format!("enabled ({groups} IOMMU groups)"))
    } else {
        let finding = "off (no IOMMU groups): no device can be passed through";
        Check::new(needed, "iommu", finding, Some(IOMMU_FIX.into()))
    });
    out.push(if paths.sys.join("bus/pci/drivers/vfio-pci").is_dir() {
        Check::ok("vfio-pci", "loaded")
    } else {
        let fix = Some("modprobe vfio-pci".to_string());
        Check::new(needed, "vfio-pci", "the vfio-pci module is not loaded", fix)
    });
    let mut found = Vec::new();
    for spec in &request.devices {
        let (checks, opened) = device(paths, spec, request.memory);
        out.extend(checks);
        found.extend(opened);
    }
    if passthrough {
        let guest_ram = request.memory.unwrap_or_default().size;
        let memlock = memlock.and_then(|m| m.check(guest_ram).map(|()| m));
        out.push(match &memlock {
            Ok(m) => Check::ok("memlock", memlock_finding(*m, guest_ram)),
            Err(e) => Check::from_error(Status::Fail, "memlock", e),
        });
        // How `hpcvm run` would open them, once each device passed on its own.
        if let (Ok(m), true) = (memlock, found.len() == request.devices.len()) {
            out.push(match crate::vfio::open_path(paths, &found, m) {
                Ok(Some(crate::vfio::OpenPath::Iommufd)) => Check::ok(
                    "vfio open",
                    "through iommufd (/dev/iommu, the devices' cdevs); pinned guest RAM \
                     counts against the user's memlock limit, all of the user's VMs together",
                ),
                Ok(_) => Check::ok(
                    "vfio open",
                    "through the VFIO container (/dev/vfio/vfio, the devices' group nodes)",
                ),
                Err((_, e)) => Check::from_error(Status::Fail, "vfio open", &e),
            });
        }
    }
    out
}

fn memlock_finding(m: Memlock, guest_ram: u64) -> String {
    let ram = host::fmt_mib(guest_ram);
    match m.limit {
        None => format!("unlimited, VFIO may pin all {ram} of guest RAM"),
        Some(l) if m.cap_ipc_lock => {
            format!(
                "CAP_IPC_LOCK lifts the {} limit for {ram}",
                host::fmt_mib(l)
            )
        }
        Some(l) => format!("{} covers {ram} of guest RAM", host::fmt_mib(l)),
    }
}

fn kvm(paths: &HostPaths) -> Vec<Check> {
    let node = paths.dev.join("kvm");
    let open = match OpenOptions::new().read(true).write(true).open(&node) {
        Ok(_) => Check::ok("kvm", format!("{} opens", node.display())),
        Err(e) if e.kind() == ErrorKind::NotFound => Check::new(
            Status::Fail,
            "kvm",
            format!("{} is missing", node.display()),
            Some(
                "load KVM (modprobe kvm_intel or kvm_amd) and enable VT-x / AMD-V in the \
                 firmware"
                    .into(),
            ),
        ),
        Err(e) => Check::new(
            Status::Fail,
            "kvm",
            format!("cannot open {}: {e}", node.display()),
            Some("add the user to the kvm group (usermod -aG kvm $USER) or run as root".into()),
        ),
    };
    let cpuinfo = std::fs::read_to_string(paths.proc_dir.join("cpuinfo")).unwrap_or_default();
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .find(|f| *f == "vmx" || *f == "svm");
    let kind = if crate::host::kvm_pvm_loaded(&paths.sys) {
        Check::new(
            Status::Warn,
            "kvm kind",
            "software KVM (kvm_pvm): guest ring-0 code is emulated, fine for tests, not for \
             production",
            Some("run production jobs on a host with VT-x / AMD-V".into()),
        )
    } else if let Some(f) = flag {
        Check::ok("kvm kind", format!("hardware ({f})"))
    } else {
        Check::new(
            Status::Warn,
            "kvm kind",
            "no vmx or svm among the CPU flags",
            Some("enable VT-x / AMD-V in the firmware (or nested virtualization)".into()),
        )
    };
    vec![open, kind]
}

fn size_name(kib: u64) -> String {
    match kib {
        2048 => "2M".into(),
        1_048_576 => "1G".into(),
        k => format!("{k}K"),
    }
}

fn kib_of(size: HugePageSize) -> u64 {
    size.bytes() >> 10
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Free pages of the `kib` pool on each NUMA node, by node.
fn per_node_free(paths: &HostPaths, kib: u64) -> Vec<(u32, u64)> {
    let nodes = paths.sys.join("devices/system/node");
    let mut out: Vec<(u32, u64)> = std::fs::read_dir(&nodes)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e.file_name().to_str()?.strip_prefix("node")?.parse().ok()?;
            let f = format!("hugepages/hugepages-{kib}kB/free_hugepages");
            Some((n, read_u64(&e.path().join(f))?))
        })
        .collect();
    out.sort_unstable();
    out
}

fn hugepages(paths: &HostPaths, memory: Option<MemoryConfig>) -> Vec<Check> {
    let root = paths.sys.join("kernel/mm/hugepages");
    let mut sizes: Vec<u64> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()
        })
        .collect();
    sizes.sort_unstable();
    let mut out = Vec::new();
    let asked = memory.filter(|m| m.hugepages.is_hugetlb());
    for &kib in &sizes {
        let dir = root.join(format!("hugepages-{kib}kB"));
        let (nr, free) = (
            read_u64(&dir.join("nr_hugepages")),
            read_u64(&dir.join("free_hugepages")),
        );
        let nodes = per_node_list(paths, kib)
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        let name = format!("hugepages {}", size_name(kib));
        let finding = format!("{} of {} free{nodes}", free.unwrap_or(0), nr.unwrap_or(0));
        match asked {
            Some(m) if kib_of(m.hugepages) == kib => out.push(asked_pool(paths, m)),
            _ => out.push(Check::ok(name, finding)),
        }
    }
    if sizes.is_empty() && asked.is_none() {
        out.push(Check::ok(
            "hugepages",
            "no hugetlb pools (only hugepages=2M|1G needs one)",
        ));
    }
    if let Some(m) = asked.filter(|m| !sizes.contains(&kib_of(m.hugepages))) {
        out.push(asked_pool(paths, m));
    }
    out
}

/// `node0: F, node1: F` of the `kib` pools' free pages; none on a host without nodes.
fn per_node_list(paths: &HostPaths, kib: u64) -> Option<String> {
    let nodes: Vec<String> = per_node_free(paths, kib)
        .iter()
        .map(|(n, f)| format!("node{n}: {f}"))
        .collect();
    (!nodes.is_empty()).then(|| nodes.join(", "))
}

/// The pool `--memory ...,hugepages=` draws from: FAIL unless it holds the guest.
fn asked_pool(paths: &HostPaths, m: MemoryConfig) -> Check {
    let size = m.hugepages.name();
    let name = format!("hugepages {size}");
    let kib = kib_of(m.hugepages);
    let pool = match HugePagePool::read_from(&paths.sys.join("kernel/mm/hugepages"), m.hugepages) {
        Ok(p) => p,
        Err(e) => {
            let fix = format!("use another page size, or a kernel and CPU with {size} pages");
            return Check::new(Status::Fail, name, e.to_string(), Some(fix));
        }
    };
    let needed = m.size.div_ceil(m.hugepages.bytes());
    let nodes = per_node_list(paths, kib)
        .map(|l| format!("; {l}"))
        .unwrap_or_default();
    let finding = format!(
        "{} of {} free, guest needs {needed}{nodes}",
        pool.available(),
        pool.total
    );
    match pool.check_can_supply(m.size) {
        Err(MemoryError::PoolTooSmall { knob, want, .. }) => Check::new(
            Status::Fail,
            name,
            finding,
            Some(format!("echo {want} > {knob}")),
        ),
        Err(e) => Check::new(Status::Fail, name, e.to_string(), None),
        Ok(()) => Check::ok(name, finding),
    }
}

/// The checks of one requested device, and the device with how it can be opened
/// when it passed.
fn device(
    paths: &HostPaths,
    spec: &str,
    memory: Option<MemoryConfig>,
) -> (Vec<Check>, Option<(HostDevice, PassthroughAccess)>) {
    // Also as `hpcvm run --device` takes it.
    let spec = spec.strip_prefix("vfio=").unwrap_or(spec);
    let name = format!("device {spec}");
    let dev = match host::resolve(paths, spec) {
        Ok(d) => d,
        Err(e) => return (vec![Check::from_error(Status::Fail, name, &e)], None),
    };
    let opened = match host::check_passthrough(paths, &dev) {
        Ok(a) => a,
        Err(e) => return (vec![Check::from_error(Status::Fail, name, &e)], None),
    };
    let access = match &opened {
        PassthroughAccess::Group { group, node } => {
            format!("IOMMU group {group} via {}", node.display())
        }
        PassthroughAccess::Cdev { node } => format!("iommufd via {}", node.display()),
    };
    let vf = dev
        .physfn
        .map(|p| format!(" (VF of {p})"))
        .unwrap_or_default();
    let numa = dev.numa_node.map_or("none".into(), |n| n.to_string());
    let id = format!("{:04x}:{:04x}", dev.vendor, dev.device);
    let finding = format!("{id}{vf} on vfio-pci, {access}, NUMA node {numa}");
    let mut out = vec![Check::ok(name, finding)];
    // Guest RAM far from the device's node makes every DMA cross the interconnect.
    if let (Some(node), Some(m)) = (dev.numa_node, memory.filter(|m| m.hugepages.is_hugetlb())) {
        let kib = kib_of(m.hugepages);
        let needed = m.size.div_ceil(m.hugepages.bytes());
        let free = per_node_free(paths, kib)
            .into_iter()
            .find(|(n, _)| *n == node)
            .map(|(_, f)| f);
        if let Some(free) = free.filter(|f| *f < needed) {
            let knob = format!(
                "/sys/devices/system/node/node{node}/hugepages/hugepages-{kib}kB/nr_hugepages"
            );
            let nr = read_u64(&paths.sys.join(&knob["/sys/".len()..])).unwrap_or(0);
            let want = nr + needed - free;
            out.push(Check::new(
                Status::Warn,
                format!("numa {}", dev.address),
                format!(
                    "node{node} has {free} free {} pages, guest needs {needed}: part of its \
                     RAM will sit on other nodes than the device",
                    m.hugepages.name()
                ),
                Some(format!("echo {want} > {knob}")),
            ));
        }
    }
    (out, Some((dev, opened)))
}

/// The report, one line per check and an indented `fix:` under warn and FAIL.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let word = match c.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out += &format!("{word:<4}  {}: {}\n", c.name, c.finding);
        if let (Some(fix), false) = (&c.fix, c.status == Status::Ok) {
            out += &format!("      fix: {fix}\n");
        }
    }
    out
}

/// 0 when everything asked for can work (warnings allowed), 1 when something cannot.
pub fn exit_status(checks: &[Check]) -> u8 {
    u8::from(checks.iter().any(|c| c.status == Status::Fail))
}

#[cfg(test)]
mod tests;
