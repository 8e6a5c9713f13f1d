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
        "vulkan" => Ok(Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(index.unwrap_or(0)))),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(index.unwrap_or(0))),
        "vulkan" | "cuda" => {
            let _ = index;
            bail!("device {spec:?} needs a binary built with `--features {kind}`")
        }
        other => bail!("unknown device {other:?} (expected cpu, vulkan[:N] or cuda[:N])"),
    }
}

/// Writes a file so that readers never see a partial one: temp file in the same directory, then
/// rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    Ok(())
}

/// Worker threads of the CPU backend (rayon's global pool: `RAYON_NUM_THREADS` or all cores).
pub fn cpu_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

pub fn env_info(device: &str) -> serde_json::Value {
    serde_json::json!({
        "wukong_version": env!("CARGO_PKG_VERSION"),
        "burn_version": "0.22.1",
        "device": device,
        "threads": cpu_threads(),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "hostname": std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn atomic_write_replaces_whole_files() {
        let p = std::env::temp_dir().join(format!("wukong-atomic-{}", std::process::id()));
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert!(!p.with_extension("tmp-write").exists());
    }
}
