//! The fixed catalogs of the simulated region: flavors, base images, networks, ports,
//! availability zones, security groups and the volumes seeded in every tenant.
//!
//! Every id here is fixed so that tests and `config/demo.yaml` can rely on it. Where the
//! spec shows an id in an example, that id is reused so the example works verbatim.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

// ---- flavors ------------------------------------------------------------------------

/// `t2.c1m1`: 1 vCPU, 1 GiB, volume-backed (disk 0).
pub const FLAVOR_T2_C1M1: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c01";
/// `u2.c1m1`: 1 vCPU, 1 GiB, 20 GB local root disk (the only kind that may boot without
/// `block_device_mapping_v2` and the only kind that may `createImage`).
pub const FLAVOR_U2_C1M1: &str = "7c5f1a0e-8a7d-4e57-9d4b-0f6d3b1e2a21";
/// `u2.c2m4`: 2 vCPU, 4 GiB, 40 GB local root disk.
pub const FLAVOR_U2_C2M4: &str = "1b8e6c44-52a5-4f0e-8c2d-6a7e9f0b3c31";
/// `m2.c1m2`: 1 vCPU, 2 GiB, volume-backed.
pub const FLAVOR_M2_C1M2: &str = "9f1d2c3b-4a5e-4f60-8b7c-1d2e3f4a5b41";
/// `m2.c2m4`: 2 vCPU, 4 GiB, volume-backed (the flavor id of the spec's server example).
pub const FLAVOR_M2_C2M4: &str = "35a73b57-58a7-434d-aa08-5249aaa95b3e";
/// `c2.c2m2`: 2 vCPU, 2 GiB, volume-backed.
pub const FLAVOR_C2_C2M2: &str = "5d6e7f80-91a2-4b3c-8d4e-5f6a7b8c9d51";
/// `r2.c2m4`: 2 vCPU, 4 GiB, volume-backed (the flavorRef of the spec's create example).
pub const FLAVOR_R2_C2M4: &str = "a4b6a0f7-aeff-4d78-a8d5-7de9f007012d";
/// `x1.c32m128` exactly as in the spec's flavor detail example.
pub const FLAVOR_X1_C32M128: &str = "31fa632d-aeec-4f12-8a57-ce9d146228e5";
/// `x1.c32m256` exactly as in the spec's flavor detail example.
pub const FLAVOR_X1_C32M256: &str = "97604802-a090-43fa-a5ce-c7cfd737fbba";

// ---- images -------------------------------------------------------------------------

/// CentOS 7.8 (the imageRef of the spec's create example).
pub const IMAGE_CENTOS_7_8: &str = "9956f822-29c9-4f81-9410-0c392d9c8c24";
/// Ubuntu Server 20.04 LTS.
pub const IMAGE_UBUNTU_20_04: &str = "f3b1c2d4-6e7a-4b8c-9d0e-1f2a3b4c5d61";
/// Windows 2012 R2 STD, with exactly the metadata of the spec's server example.
pub const IMAGE_WINDOWS_2012_R2: &str = "8b9f8d47-b89b-45af-b1d6-3f7ce7e06a11";

// ---- networks -----------------------------------------------------------------------

/// Network `vpc1`, 192.168.0.0/24.
pub const NETWORK_VPC1: &str = "e7a1c3f5-2b4d-4e6f-8a0c-1e3f5a7c9b01";
/// The subnet of `vpc1` (the `subnet` of the spec's create example).
pub const SUBNET_VPC1: &str = "b83863ff-0355-4c73-8c10-0bdf66a69aab";
/// Network `vpc2`, 172.16.0.0/24 (the network name of the spec's server example).
pub const NETWORK_VPC2: &str = "4c2e6a8b-0d1f-4a3c-9e5b-7d9f1b3d5f02";
/// The subnet of `vpc2`.
pub const SUBNET_VPC2: &str = "6f8a0c2e-4b6d-4f8a-8c1e-3a5c7e9b1d03";
/// A pre-created, unattached port on `vpc1` with fixed IP 192.168.0.200.
pub const PORT_VPC1_A: &str = "d1e2f3a4-b5c6-4d7e-8f90-a1b2c3d4e5f6";
/// A pre-created, unattached port on `vpc1` with fixed IP 192.168.0.201.
pub const PORT_VPC1_B: &str = "0f9e8d7c-6b5a-4c3d-9e2f-1a0b9c8d7e6f";

// ---- availability zones -------------------------------------------------------------

/// The zones, in the order of the spec's example. The first is used when none is asked.
pub const AVAILABILITY_ZONES: [&str; 2] = ["kr-pub-a", "kr-pub-b"];

/// Security groups that exist in every tenant (there is no security group API in the
/// spec; `test` is there so the spec's addSecurityGroup example works verbatim).
pub const SECURITY_GROUPS: [&str; 4] = ["default", "web", "ssh", "test"];

// ---- volumes ------------------------------------------------------------------------

/// Available volumes seeded in the `web` demo tenant (the first two are the ids of the
/// spec's volume attachment examples).
pub const WEB_VOLUMES: [&str; 3] = [
    "a07f71dc-8151-4e7d-a0cc-cd24a3f11113",
    "227cc671-f30b-4488-96fd-7d0bf13648d8",
    "5b9c1d3e-7f2a-4b6c-8d0e-2f4a6c8e0a13",
];
/// Available volumes seeded in the `batch` demo tenant.
pub const BATCH_VOLUMES: [&str; 3] = [
    "c3d5e7f9-1a2b-4c4d-8e6f-7a9b1c3d5e21",
    "e5f7a9b1-3c4d-4e6f-9a8b-9c1d3e5f7a22",
    "0b2d4f6a-8c0e-4a2b-8d4f-6a8c0e2b4d23",
];

/// The ids of the three available volumes seeded in `tenant_id`: the fixed ones above
/// for the two demo tenants, otherwise ids derived from the tenant id (stable across
/// runs, so a test with its own accounts can compute them too).
pub fn seeded_volume_ids(tenant_id: &str) -> Vec<String> {
    if tenant_id == super::DEMO_WEB_TENANT_ID {
        return WEB_VOLUMES.iter().map(|s| s.to_string()).collect();
    }
    if tenant_id == super::DEMO_BATCH_TENANT_ID {
        return BATCH_VOLUMES.iter().map(|s| s.to_string()).collect();
    }
    (0..3)
        .map(|i| {
            let digest = Sha256::digest(format!("toastgate-sim-volume:{tenant_id}:{i}"));
            uuid_from_bytes(&digest[..16])
        })
        .collect()
}

/// Formats 16 bytes as a version-4-looking UUID.
fn uuid_from_bytes(b: &[u8]) -> String {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&b[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(bytes).hyphenated().to_string()
}

// ---- types --------------------------------------------------------------------------

pub(crate) struct Flavor {
    pub id: &'static str,
    pub name: &'static str,
    pub vcpus: u32,
    pub ram: u32,
    pub disk: u32,
    pub flavor_type: &'static str,
}

impl Flavor {
    /// u2 flavors have a local root disk; every other TOAST flavor is volume-backed.
    pub fn is_local_disk(&self) -> bool {
        self.name.starts_with("u2.")
    }
}

/// The flavor catalog. `flavor_type` values other than x1's `performance` (from the
/// spec) are invented, one per family.
pub(crate) const FLAVORS: &[Flavor] = &[
    Flavor {
        id: FLAVOR_T2_C1M1,
        name: "t2.c1m1",
        vcpus: 1,
        ram: 1024,
        disk: 0,
        flavor_type: "minimum",
    },
    Flavor {
        id: FLAVOR_U2_C1M1,
        name: "u2.c1m1",
        vcpus: 1,
        ram: 1024,
        disk: 20,
        flavor_type: "local",
    },
    Flavor {
        id: FLAVOR_U2_C2M4,
        name: "u2.c2m4",
        vcpus: 2,
        ram: 4096,
        disk: 40,
        flavor_type: "local",
    },
    Flavor {
        id: FLAVOR_M2_C1M2,
        name: "m2.c1m2",
        vcpus: 1,
        ram: 2048,
        disk: 0,
        flavor_type: "general",
    },
    Flavor {
        id: FLAVOR_M2_C2M4,
        name: "m2.c2m4",
        vcpus: 2,
        ram: 4096,
        disk: 0,
        flavor_type: "general",
    },
    Flavor {
        id: FLAVOR_C2_C2M2,
        name: "c2.c2m2",
        vcpus: 2,
        ram: 2048,
        disk: 0,
        flavor_type: "compute",
    },
    Flavor {
        id: FLAVOR_R2_C2M4,
        name: "r2.c2m4",
        vcpus: 2,
        ram: 4096,
        disk: 0,
        flavor_type: "memory",
    },
    Flavor {
        id: FLAVOR_X1_C32M128,
        name: "x1.c32m128",
        vcpus: 32,
        ram: 131072,
        disk: 0,
        flavor_type: "performance",
    },
    Flavor {
        id: FLAVOR_X1_C32M256,
        name: "x1.c32m256",
        vcpus: 32,
        ram: 262144,
        disk: 0,
        flavor_type: "performance",
    },
];

pub(crate) fn flavor(id: &str) -> Option<&'static Flavor> {
    FLAVORS.iter().find(|f| f.id == id)
}

/// Flavors in Nova's default order (flavor id ascending).
pub(crate) fn flavors_sorted() -> Vec<&'static Flavor> {
    let mut all: Vec<&Flavor> = FLAVORS.iter().collect();
    all.sort_by(|a, b| a.id.cmp(b.id));
    all
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum OsType {
    Linux,
    Windows,
}

impl OsType {
    /// Smallest root volume (GB) the spec allows for this OS family.
    pub fn min_root_gb(self) -> u32 {
        match self {
            OsType::Linux => 10,
            OsType::Windows => 50,
        }
    }
}

/// Largest root volume (GB) the spec allows (1 TB).
pub(crate) const MAX_ROOT_GB: u32 = 1000;

pub(crate) struct BaseImage {
    pub id: &'static str,
    pub name: &'static str,
    pub os_type: OsType,
    pub min_disk: u32,
    pub min_ram: u32,
    pub size: u64,
    pub metadata: &'static [(&'static str, &'static str)],
}

pub(crate) const BASE_IMAGES: &[BaseImage] = &[
    BaseImage {
        id: IMAGE_CENTOS_7_8,
        name: "CentOS 7.8 (2020.07.21)",
        os_type: OsType::Linux,
        min_disk: 10,
        min_ram: 0,
        size: 1_024_131_072,
        metadata: &[
            ("os_distro", "CentOS"),
            ("description", "CentOS 7.8 (2020.07.21)"),
            ("os_version", "7.8"),
            ("project_domain", "NORMAL"),
            ("hypervisor_type", "qemu"),
            ("monitoring_agent", "sysmon"),
            ("image_name", "CentOS 7.8 (2020.07.21)"),
            ("volume_size", "20"),
            ("os_architecture", "amd64"),
            ("login_username", "centos"),
            ("os_type", "linux"),
            ("tc_env", "sysmon"),
        ],
    },
    BaseImage {
        id: IMAGE_UBUNTU_20_04,
        name: "Ubuntu Server 20.04 LTS (2020.07.21)",
        os_type: OsType::Linux,
        min_disk: 10,
        min_ram: 0,
        size: 1_190_871_040,
        metadata: &[
            ("os_distro", "Ubuntu"),
            ("description", "Ubuntu Server 20.04 LTS (2020.07.21)"),
            ("os_version", "Server 20.04 LTS"),
            ("project_domain", "NORMAL"),
            ("hypervisor_type", "qemu"),
            ("monitoring_agent", "sysmon"),
            ("image_name", "Ubuntu Server 20.04 LTS (2020.07.21)"),
            ("volume_size", "20"),
            ("os_architecture", "amd64"),
            ("login_username", "ubuntu"),
            ("os_type", "linux"),
            ("tc_env", "sysmon"),
        ],
    },
    BaseImage {
        id: IMAGE_WINDOWS_2012_R2,
        name: "Windows 2012 R2 STD (2020.02.18) EN",
        os_type: OsType::Windows,
        min_disk: 50,
        min_ram: 2048,
        size: 9_458_155_520,
        metadata: &[
            ("os_distro", "Windows"),
            ("description", "Windows 2012 R2 STD (2020.02.18)"),
            ("os_version", "2012 R2 STD"),
            ("project_domain", "NORMAL"),
            ("hypervisor_type", "qemu"),
            ("monitoring_agent", "sysmon"),
            ("image_name", "Windows 2012 R2 STD (2020.02.18) EN"),
            ("volume_size", "50"),
            ("os_architecture", "amd64"),
            ("login_username", "Administrator"),
            ("os_type", "Windows"),
            ("tc_env", "sysmon"),
        ],
    },
];

impl BaseImage {
    pub fn metadata_map(&self) -> BTreeMap<String, String> {
        self.metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[derive(Debug)]
pub(crate) struct Network {
    pub id: &'static str,
    pub name: &'static str,
    pub subnet_id: &'static str,
    /// The /24 prefix: addresses are `prefix.N`.
    pub prefix: [u8; 3],
}

pub(crate) const NETWORKS: &[Network] = &[
    Network {
        id: NETWORK_VPC1,
        name: "vpc1",
        subnet_id: SUBNET_VPC1,
        prefix: [192, 168, 0],
    },
    Network {
        id: NETWORK_VPC2,
        name: "vpc2",
        subnet_id: SUBNET_VPC2,
        prefix: [172, 16, 0],
    },
];

impl Network {
    /// Host addresses handed out to servers: .1 is the gateway, .2-.9 are reserved like
    /// the provider's DHCP/DNS ports.
    pub fn allocatable(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (10u8..=254).map(|n| Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], n))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let o = ip.octets();
        o[..3] == self.prefix && (2..=254).contains(&o[3])
    }
}

pub(crate) fn network_by_id(id: &str) -> Option<&'static Network> {
    NETWORKS.iter().find(|n| n.id == id)
}

pub(crate) fn network_by_subnet(id: &str) -> Option<&'static Network> {
    NETWORKS.iter().find(|n| n.subnet_id == id)
}

pub(crate) fn network_for_ip(ip: Ipv4Addr) -> Option<&'static Network> {
    NETWORKS.iter().find(|n| n.contains(ip))
}

pub(crate) struct SeedPort {
    pub id: &'static str,
    pub network: &'static str,
    pub ip: Ipv4Addr,
    pub mac: &'static str,
}

pub(crate) const SEED_PORTS: &[SeedPort] = &[
    SeedPort {
        id: PORT_VPC1_A,
        network: NETWORK_VPC1,
        ip: Ipv4Addr::new(192, 168, 0, 200),
        mac: "fa:16:3e:00:c8:01",
    },
    SeedPort {
        id: PORT_VPC1_B,
        network: NETWORK_VPC1,
        ip: Ipv4Addr::new(192, 168, 0, 201),
        mac: "fa:16:3e:00:c9:02",
    },
];
