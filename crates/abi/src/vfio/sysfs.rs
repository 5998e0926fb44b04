//! The sysfs entries VFIO users look a PCI device up by, for the declared
//! functions: a directory tree laid out as Linux's `/sys` (device
//! directories with `vendor`, `device`, `class`, `resource`, `config`,
//! `iommu_group` and `vfio-dev/vfioN`; `kernel/iommu_groups/N`; the
//! `bus/pci/devices` links), written once per run into a directory of its
//! own. The preload shim sends lookups of these `/sys` paths there, so
//! relative links resolve inside the tree as they would in sysfs.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;

use ioasid_engine::pci::BarKind;

use super::declared::{Declared, DeviceSpec};

/// The environment variable naming the tree's directory.
pub const ENV: &str = "IOASID_SYSFS";

/// The character device numbers the VFIO device files report (Linux gives
/// `vfio-dev` a dynamic major; this is the one ioasid reports).
pub const VFIO_DEV_MAJOR: u32 = 236;

/// A function's device directory, relative to the tree's root (as to `/sys`).
fn device_rel(spec: &DeviceSpec) -> String {
    format!("devices/pci{:04x}:00/{}", spec.bdf.domain, spec.bdf)
}

/// The `/sys` paths the shim sends to the tree for the function declared
/// `index`-th as `spec`: its device directory by both names, its IOMMU
/// group, and the driver directory that lists it.
pub fn prefixes(spec: &DeviceSpec, index: u32) -> [String; 4] {
    [
        format!("/sys/bus/pci/devices/{}", spec.bdf),
        format!("/sys/{}", device_rel(spec)),
        format!("/sys/kernel/iommu_groups/{index}"),
        "/sys/bus/pci/drivers/vfio-pci".to_string(),
    ]
}

fn cfg(d: &Declared, offset: usize, len: usize) -> u32 {
    let mut b = [0u8; 4];
    d.function.config_read(offset, &mut b[..len]);
    u32::from_le_bytes(b)
}

/// Writes the tree for `devices` under `root` (which must exist).
pub fn write_tree(root: &Path, devices: &[impl AsRef<Declared>]) -> io::Result<()> {
    fs::create_dir_all(root.join("bus/pci/drivers/vfio-pci"))?;
    fs::create_dir_all(root.join("bus/pci/devices"))?;
    for d in devices {
        let d = d.as_ref();
        let rel = device_rel(&d.spec);
        let dir = root.join(&rel);
        fs::create_dir_all(dir.join(format!("vfio-dev/vfio{}", d.index)))?;
        let hex = |v: u32, digits: usize| format!("0x{v:0digits$x}\n");
        fs::write(dir.join("vendor"), hex(cfg(d, 0x00, 2), 4))?;
        fs::write(dir.join("device"), hex(cfg(d, 0x02, 2), 4))?;
        fs::write(dir.join("subsystem_vendor"), hex(cfg(d, 0x2c, 2), 4))?;
        fs::write(dir.join("subsystem_device"), hex(cfg(d, 0x2e, 2), 4))?;
        fs::write(dir.join("class"), hex(cfg(d, 0x08, 4) >> 8, 6))?;
        fs::write(dir.join("revision"), hex(cfg(d, 0x08, 1), 2))?;
        fs::write(dir.join("irq"), "0\n")?;
        fs::write(dir.join("numa_node"), "-1\n")?;
        fs::write(dir.join("driver_override"), "vfio-pci\n")?;
        fs::write(dir.join("reset_method"), "flr\n")?;
        let (vendor, device) = (cfg(d, 0x00, 2), cfg(d, 0x02, 2));
        let class = cfg(d, 0x08, 4) >> 8;
        fs::write(
            dir.join("modalias"),
            format!(
                "pci:v{vendor:08X}d{device:08X}sv*sd*bc{:02X}sc{:02X}i{:02X}\n",
                class >> 16,
                (class >> 8) & 0xff,
                class & 0xff
            ),
        )?;
        fs::write(
            dir.join("uevent"),
            format!(
                "DRIVER=vfio-pci\nPCI_CLASS={class:X}\nPCI_ID={vendor:04X}:{device:04X}\nPCI_SLOT_NAME={}\n",
                d.spec.bdf
            ),
        )?;
        let mut config = vec![0u8; d.function.config_size()];
        d.function.config_read(0, &mut config);
        fs::write(dir.join("config"), config)?;
        fs::write(dir.join("resource"), resource_text(d))?;
        fs::write(dir.join(format!("vfio-dev/vfio{}/dev", d.index)), format!("{VFIO_DEV_MAJOR}:{}\n", d.index))?;
        fs::write(
            dir.join(format!("vfio-dev/vfio{}/uevent", d.index)),
            format!("MAJOR={VFIO_DEV_MAJOR}\nMINOR={}\nDEVNAME=vfio/devices/vfio{}\n", d.index, d.index),
        )?;
        let group = root.join(format!("kernel/iommu_groups/{}", d.index));
        fs::create_dir_all(group.join("devices"))?;
        fs::write(group.join("type"), "DMA\n")?;
        relink(&format!("../../../../{rel}"), &group.join(format!("devices/{}", d.spec.bdf)))?;
        relink(&format!("../../../kernel/iommu_groups/{}", d.index), &dir.join("iommu_group"))?;
        relink("../../../bus/pci/drivers/vfio-pci", &dir.join("driver"))?;
        relink("../../../bus/pci", &dir.join("subsystem"))?;
        relink(&format!("../../../{rel}"), &root.join(format!("bus/pci/devices/{}", d.spec.bdf)))?;
        relink(&format!("../../../../{rel}"), &root.join(format!("bus/pci/drivers/vfio-pci/{}", d.spec.bdf)))?;
    }
    Ok(())
}

/// `resource`: one line per BAR (and ROM and bridge windows) of start, end
/// and flags; emulated BARs are placed nowhere, so their start is 0 and
/// their end their size less one, as tools only read sizes from it.
fn resource_text(d: &Declared) -> String {
    let mut s = String::new();
    for i in 0..13 {
        let (end, flags) = match (i < 6).then(|| d.function.bar(i)).flatten() {
            Some(bar) => {
                let flags: u64 = match bar.kind {
                    BarKind::Io => 0x101,
                    BarKind::Mem32 => 0x40200,
                    BarKind::Mem64 => 0x140204,
                } | if bar.prefetchable { 0x2000 } else { 0 };
                (bar.size - 1, flags)
            }
            None => (0, 0),
        };
        let _ = writeln!(s, "0x{:016x} 0x{end:016x} 0x{flags:016x}", 0);
    }
    s
}

fn relink(target: &str, link: &Path) -> io::Result<()> {
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    symlink(target, link)
}
