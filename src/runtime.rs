//! The edge: device selection, atomic file writes, environment facts for run directories.

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use std::path::Path;

/// Parses `--device`: `cpu` (Flex, the default), `vulkan[:N]` and `cuda[:N]` when built with
/// those features.
pub fn parse_device(spec: &str) -> Result<Device> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => (k, Some(i.parse::<usize>().with_context(|| format!("bad device index in {spec:?}"))?)),
        None => (spec, None),
    };
    match kind {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "vulkan")]
        "vulkan" => probe(
            spec,
            Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(index.unwrap_or(0))),
            "needs a Vulkan driver for the GPU and the Vulkan loader (libvulkan.so.1; scripts/gpu/prepare.sh bundles it, run.sh points LD_LIBRARY_PATH at it)",
        ),
        #[cfg(feature = "cuda")]
        "cuda" => probe(spec, Device::cuda(index.unwrap_or(0)), "needs an NVIDIA GPU with its CUDA driver"),
        #[cfg(not(feature = "vulkan"))]
        "vulkan" => bail!("device {spec:?} needs a binary built with `--features vulkan`"),
        #[cfg(not(feature = "cuda"))]
        "cuda" => bail!("device {spec:?} needs a binary built with `--features cuda` (index {index:?})"),
        other => bail!("unknown device {other:?} (expected cpu, vulkan[:N] or cuda[:N])"),
    }
}

/// Runs one tiny computation on a GPU device, turning the backend's panics (no adapter, no
/// driver; they happen on the backend's own threads) into an error that says what is missing.
#[cfg(any(feature = "vulkan", feature = "cuda"))]
fn probe(spec: &str, device: Device, needs: &str) -> Result<Device> {
    use std::sync::{Arc, Mutex};
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&messages);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        sink.lock().map(|mut m| m.push(msg)).ok();
    }));
    let d = device.clone();
    let result = std::panic::catch_unwind(move || burn::tensor::Tensor::<1>::ones([4], &d).sum().into_scalar::<f32>());
    std::panic::set_hook(previous);
    match result {
        Ok(v) if v == 4.0 => Ok(device),
        Ok(v) => bail!("device {spec:?} computed 1+1+1+1 = {v}"),
        Err(_) => {
            let cause = messages
                .lock()
                .map(|m| m.iter().find(|s| !s.contains("RecvError")).or(m.first()).cloned().unwrap_or_default())
                .unwrap_or_default();
            bail!("device {spec:?} is not usable: {cause}. It {needs}.")
        }
    }
}

/// Writes a file so that readers never see a partial one and a crash (even of the machine)
/// leaves the old or the new version: temp file in the same directory, fsync, rename, fsync of
/// the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp-write");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("cannot fsync {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    if let Some(dir) = path.parent() {
        sync_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })?;
    }
    Ok(())
}

/// fsync of a directory, so that a rename in it survives a power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot fsync directory {}", dir.display()))
}

/// Worker threads of the CPU backend (rayon's global pool: `RAYON_NUM_THREADS` or all cores).
pub fn cpu_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// A field of /proc/cpuinfo's first processor (`model name`, `flags`, …).
fn cpuinfo_field(key: &str) -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string())
}

/// Whether /proc/cpuinfo lists `flag` for the CPU (false where it cannot be read).
pub fn cpu_flag(flag: &str) -> bool {
    cpuinfo_field("flags").is_some_and(|f| f.split_whitespace().any(|f| f == flag))
}

/// Whether the CPU has bf16 matrix units (AVX512-BF16 or AMX-BF16).
pub fn cpu_has_bf16_units() -> bool {
    cpu_flag("avx512_bf16") || cpu_flag("amx_bf16")
}

/// The CPU model, cores and SIMD/bf16/AMX flags (from /proc/cpuinfo), for benchmark headers:
/// figures are only comparable on the same machine.
pub fn cpu_line() -> String {
    let model = cpuinfo_field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let flags = cpuinfo_field("flags").unwrap_or_default();
    let wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"];
    let have: Vec<&str> = wanted.iter().copied().filter(|w| flags.split_whitespace().any(|f| f == *w)).collect();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!(
        "CPU: {model}, {cores} logical cores, flags: {}",
        if have.is_empty() { "none of avx2/avx512/bf16/amx".into() } else { have.join(" ") }
    )
}

pub fn env_info(device: &str) -> serde_json::Value {
    serde_json::json!({
        "wukong_version": env!("CARGO_PKG_VERSION"),
        "git_commit": env!("WUKONG_GIT_COMMIT"),
        "burn_version": "0.22.1",
        "device": device,
        "threads": cpu_threads(),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "hostname": std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim(),
    })
}

/// This process's own executable, for re-launching itself as a child (`wukong tune`'s parallel
/// trials). On Linux `/proc/self/exe`: a fork executes it as the image this process runs, even
/// after the file was rebuilt or replaced — a search lasting days outlives rebuilds, and
/// `current_exe()` then names "… (deleted)", which cannot be started. Only for a direct spawn: a
/// launcher (`mpirun`) would resolve the path as its own binary.
pub fn own_executable() -> std::io::Result<std::path::PathBuf> {
    let proc_self = std::path::Path::new("/proc/self/exe");
    if cfg!(target_os = "linux") && proc_self.exists() { Ok(proc_self.to_path_buf()) } else { std::env::current_exe() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_executable_can_be_started_again() {
        // the unit-test binary here; `--list` makes it print its tests and exit 0
        let exe = own_executable().unwrap();
        #[cfg(target_os = "linux")]
        assert_eq!(exe, std::path::Path::new("/proc/self/exe"));
        let out = std::process::Command::new(&exe).arg("--list").output().unwrap();
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("our_own_executable_can_be_started_again"));
    }

    #[test]
    fn device_specs() {
        assert!(parse_device("cpu").is_ok());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("unknown device"), "{err}");
        assert!(parse_device("cuda:x").is_err());
        #[cfg(not(feature = "vulkan"))]
        {
            let err = parse_device("vulkan:0").unwrap_err().to_string();
            assert!(err.contains("--features vulkan"), "{err}");
        }
    }

    /// With the GPU feature, a missing GPU/driver is an error that names the device, not a panic.
    #[cfg(feature = "vulkan")]
    #[test]
    fn vulkan_probe_errors_instead_of_panicking() {
        match parse_device("vulkan") {
            Ok(d) => assert_eq!(burn::tensor::Tensor::<1>::ones([2], &d).sum().into_scalar::<f32>(), 2.0),
            Err(e) => assert!(e.to_string().contains("\"vulkan\" is not usable"), "{e}"),
        }
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let p = std::env::temp_dir().join(format!("wukong-atomic-{}", std::process::id()));
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert!(!p.with_extension("tmp-write").exists());
    }
}
