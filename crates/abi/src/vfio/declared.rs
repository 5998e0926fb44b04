//! The emulated PCI functions a run declares (`ioasid run --device`), each
//! behind a chosen IOMMU model: how they are spelled, and the process-wide
//! list the VFIO files are opened on.
//!
//! A declaration is `MODEL[,bdf=DDDD:BB:DD.F][,iommu=NAME][,pasid=BITS][,pri=on|off]`;
//! several are joined by `;` in the `IOASID_DEVICES` environment variable
//! that `ioasid run` hands the program. Device `N` (from 0, in declaration
//! order) is `/dev/vfio/devices/vfioN` and IOMMU group `N`.

use std::fmt;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use ioasid_engine::pci::{self, Bus, FunctionConfig, Irq, PciFunction};
use ioasid_engine::{Device, DeviceInfo, DmaError, IommuModel};
use parking_lot::Mutex;

use super::irq::Irqs;

/// The environment variable that carries a run's declarations.
pub const ENV: &str = "IOASID_DEVICES";

/// A PCI address: domain, bus, device, function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number (0–31).
    pub device: u8,
    /// Function number (0–7).
    pub function: u8,
}

impl Bdf {
    /// The requester ID the function's DMA carries.
    pub fn rid(self) -> u32 {
        u32::from(self.bus) << 8 | u32::from(self.device) << 3 | u32::from(self.function)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

impl std::str::FromStr for Bdf {
    type Err = String;

    /// `DDDD:BB:DD.F`, or `BB:DD.F` in domain 0, as `lspci` prints them.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad PCI address {s:?}: expected DDDD:BB:DD.F (hex), e.g. 0000:01:00.0");
        let (rest, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, v] => (*d, *b, *v),
            [b, v] => ("0", *b, *v),
            _ => return Err(bad()),
        };
        let hex = |t: &str, max: u32| u32::from_str_radix(t, 16).ok().filter(|v| *v <= max).ok_or_else(bad);
        Ok(Bdf {
            domain: hex(domain, 0xffff)? as u16,
            bus: hex(bus, 0xff)? as u8,
            device: hex(device, 31)? as u8,
            function: hex(function, 7)? as u8,
        })
    }
}

/// The IOMMU models a declaration may name, with what they are.
pub const IOMMUS: &[(&str, &str)] = &[
    ("vtd", "Intel VT-d, 4-level second stage (the default)"),
    ("vtd5", "Intel VT-d, 5-level second stage"),
    ("smmuv3", "Arm SMMUv3"),
    ("amd", "AMD-Vi"),
    ("selftest", "Linux's selftest mock IOMMU"),
];

fn iommu_named(name: &str) -> Option<IommuModel> {
    Some(match name {
        "vtd" | "intel" => IommuModel::VTD,
        "vtd5" => IommuModel::IntelVtd { levels: 5 },
        "smmuv3" | "arm" => IommuModel::ArmSmmuV3,
        "amd" => IommuModel::AmdVi,
        "selftest" | "mock" => IommuModel::Selftest { huge: false },
        _ => return None,
    })
}

/// One declared function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The model's name (`pci::models()`).
    pub model: String,
    /// Where it sits.
    pub bdf: Bdf,
    /// The IOMMU in front of it.
    pub iommu: IommuModel,
    /// Its PASID and PRI capabilities.
    pub config: FunctionConfig,
}

impl DeviceSpec {
    /// Parses one declaration; `index` picks the default address
    /// (`0000:0N:00.0` for the N-th, from 1).
    pub fn parse(text: &str, index: usize) -> Result<Self, String> {
        let mut parts = text.split(',');
        let model = parts.next().unwrap_or_default().trim();
        if !pci::models().iter().any(|(name, _)| *name == model) {
            let known: Vec<&str> = pci::models().iter().map(|(n, _)| *n).collect();
            return Err(format!("unknown device model {model:?}; known models: {}", known.join(", ")));
        }
        let mut spec = DeviceSpec {
            model: model.to_string(),
            bdf: Bdf {
                domain: 0,
                bus: u8::try_from(index + 1).map_err(|_| "too many devices".to_string())?,
                device: 0,
                function: 0,
            },
            iommu: IommuModel::VTD,
            config: FunctionConfig::default(),
        };
        for part in parts {
            let (key, value) =
                part.split_once('=').ok_or_else(|| format!("{part:?} in {text:?}: expected key=value"))?;
            match key {
                "bdf" | "host" | "addr" => spec.bdf = value.parse()?,
                "iommu" => {
                    spec.iommu = iommu_named(value).ok_or_else(|| {
                        let known: Vec<&str> = IOMMUS.iter().map(|(n, _)| *n).collect();
                        format!("unknown IOMMU model {value:?}; known: {}", known.join(", "))
                    })?
                }
                "pasid" => {
                    spec.config.pasid_log2 = value
                        .parse()
                        .ok()
                        .filter(|b| *b <= 20)
                        .ok_or_else(|| format!("pasid={value}: expected the PASID width in bits, 0 to 20"))?
                }
                "pri" => {
                    spec.config.pri = match value {
                        "on" | "yes" | "true" | "1" => true,
                        "off" | "no" | "false" | "0" => false,
                        _ => return Err(format!("pri={value}: expected on or off")),
                    }
                }
                _ => return Err(format!("unknown device option {key:?} (known: bdf, iommu, pasid, pri)")),
            }
        }
        if spec.config.pri && spec.config.pasid_log2 == 0 {
            // PRI requests name the PASID they fault at; the engine's PRI
            // path is per PASID, as the PCIe spec pairs them.
            return Err(format!("{text:?}: pri=on needs a PASID capability (pasid=BITS)"));
        }
        Ok(spec)
    }

    /// Parses a `;`-separated list, refusing two functions at one address.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        let specs: Vec<Self> = text
            .split(';')
            .filter(|s| !s.trim().is_empty())
            .enumerate()
            .map(|(i, s)| Self::parse(s.trim(), i))
            .collect::<Result<_, _>>()?;
        for (i, a) in specs.iter().enumerate() {
            if specs[..i].iter().any(|b| b.bdf == a.bdf) {
                return Err(format!("two devices at {}", a.bdf));
            }
        }
        Ok(specs)
    }

    /// The declaration in the form `parse` reads.
    pub fn to_arg(&self) -> String {
        let iommu = match self.iommu {
            IommuModel::IntelVtd { levels: 5 } => "vtd5",
            IommuModel::IntelVtd { .. } => "vtd",
            IommuModel::ArmSmmuV3 => "smmuv3",
            IommuModel::AmdVi => "amd",
            IommuModel::Selftest { .. } => "selftest",
        };
        let mut s = format!("{},bdf={},iommu={iommu}", self.model, self.bdf);
        if self.config.pasid_log2 > 0 {
            s += &format!(",pasid={}", self.config.pasid_log2);
        }
        if self.config.pri {
            s += ",pri=on";
        }
        s
    }

    /// The function as its IOMMU sees it, for binding to an iommufd.
    pub fn device_info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::behind(self.iommu, format!("{} {}", self.model, self.bdf), self.bdf.rid());
        info.max_pasid_log2 = self.config.pasid_log2;
        info.pri = self.config.pri;
        info
    }
}

/// A declared function, alive for the whole process.
pub struct Declared {
    /// How it was declared.
    pub spec: DeviceSpec,
    /// Its number: `vfioN` and IOMMU group `N`.
    pub index: u32,
    /// The model.
    pub function: Arc<dyn PciFunction>,
    /// What the model reaches: the bound device's DMA and the interrupts.
    pub port: Arc<Port>,
    /// The same port as the model takes it.
    pub bus: Arc<dyn Bus>,
    /// Serialises open, bind and close, as Linux's `dev_set->lock` does.
    pub(crate) lock: Mutex<OpenState>,
}

/// Who has the function open.
#[derive(Default)]
pub(crate) struct OpenState {
    /// Open device files that were granted access (bound, or opened
    /// through a group).
    pub open_count: u32,
    /// A group file is open (only one may be, as in Linux).
    pub group_open: bool,
}

/// The model's side of the bus: DMA through the engine device the
/// function is bound as (none while unbound: the DMA is blocked, as with
/// bus mastering off), and its interrupts to the program's eventfds.
pub struct Port {
    pub(crate) device: ArcSwapOption<Device>,
    pub(crate) irqs: Mutex<Irqs>,
}

impl Bus for Port {
    fn dma_read(&self, pasid: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let dev = self.device.load();
        let dev = dev.as_deref().ok_or(DmaError::Blocked)?;
        dev.port(pasid).read(iova, buf)
    }

    fn dma_write(&self, pasid: Option<u32>, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        let dev = self.device.load();
        let dev = dev.as_deref().ok_or(DmaError::Blocked)?;
        dev.port(pasid).write(iova, buf)
    }

    fn interrupt(&self, irq: Irq) {
        self.irqs.lock().raise(irq);
    }
}

static DECLARED: OnceLock<Vec<Arc<Declared>>> = OnceLock::new();

/// The functions this process declares: from `IOASID_DEVICES`, unless
/// `declare` came first. A bad variable declares nothing and says why once.
pub fn all() -> &'static [Arc<Declared>] {
    DECLARED.get_or_init(|| {
        let Ok(text) = std::env::var(ENV) else { return Vec::new() };
        match DeviceSpec::parse_list(&text) {
            Ok(specs) => build(specs),
            Err(e) => {
                eprintln!("ioasid: {ENV}: {e}; no devices declared");
                Vec::new()
            }
        }
    })
}

/// Declares `specs` for this process (the library's way to what
/// `--device` does); fails once the list is fixed.
pub fn declare(specs: Vec<DeviceSpec>) -> Result<(), String> {
    DECLARED.set(build(specs)).map_err(|_| "devices are already declared for this process".to_string())
}

fn build(specs: Vec<DeviceSpec>) -> Vec<Arc<Declared>> {
    specs
        .into_iter()
        .enumerate()
        .filter_map(|(i, spec)| {
            let function = pci::create(&spec.model, spec.config)?;
            let counts = function.irqs();
            let port = Arc::new(Port { device: ArcSwapOption::empty(), irqs: Mutex::new(Irqs::new(counts)) });
            Some(Arc::new(Declared {
                spec,
                index: i as u32,
                function,
                bus: port.clone(),
                port,
                lock: Mutex::new(OpenState::default()),
            }))
        })
        .collect()
}

/// Declared function `index` (`vfioN`, group `N`).
pub fn by_index(index: u32) -> Option<&'static Arc<Declared>> {
    all().iter().find(|d| d.index == index)
}

/// The declared function named `name` (`DDDD:BB:DD.F`), as
/// `VFIO_GROUP_GET_DEVICE_FD` names devices.
pub fn by_name(name: &str) -> Option<&'static Arc<Declared>> {
    let bdf: Bdf = name.parse().ok()?;
    all().iter().find(|d| d.spec.bdf == bdf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_as_lspci_spells_them() {
        let b: Bdf = "0000:01:1f.7".parse().unwrap();
        assert_eq!((b.bus, b.device, b.function), (1, 31, 7));
        assert_eq!(b.to_string(), "0000:01:1f.7");
        assert_eq!("02:00.1".parse::<Bdf>().unwrap().to_string(), "0000:02:00.1");
        assert_eq!(b.rid(), 0x1ff);
        for bad in ["", "0000:01:20.0", "0000:01:00.8", "1:2:3:4.0", "0000:100:00.0", "zz:00.0"] {
            assert!(bad.parse::<Bdf>().is_err(), "{bad}");
        }
    }

    #[test]
    fn declarations_parse_with_defaults_and_refuse_nonsense() {
        let s = DeviceSpec::parse("pci-epf-test", 0).unwrap();
        assert_eq!((s.bdf.to_string(), s.iommu), ("0000:01:00.0".to_string(), IommuModel::VTD));
        let s = DeviceSpec::parse("pci-epf-test,bdf=0000:03:00.0,iommu=smmuv3,pasid=8,pri=on", 0).unwrap();
        assert_eq!((s.bdf.bus, s.iommu, s.config.pasid_log2, s.config.pri), (3, IommuModel::ArmSmmuV3, 8, true));
        assert_eq!(DeviceSpec::parse(&s.to_arg(), 0).unwrap(), s);
        for bad in [
            "nosuchmodel",
            "pci-epf-test,iommu=sparc",
            "pci-epf-test,pasid=21",
            "pci-epf-test,pri=on",
            "pci-epf-test,colour=blue",
            "pci-epf-test,bdf",
        ] {
            assert!(DeviceSpec::parse(bad, 0).is_err(), "{bad}");
        }
        let two = DeviceSpec::parse_list("pci-epf-test;pci-epf-test").unwrap();
        assert_eq!((two[0].bdf.bus, two[1].bdf.bus), (1, 2));
        assert!(DeviceSpec::parse_list("pci-epf-test,bdf=01:00.0;pci-epf-test,bdf=01:00.0").is_err());
    }
}
