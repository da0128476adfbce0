//! The simulated world: issued tokens, and per tenant its key pairs, servers, volumes and
//! snapshot images; plus the region-wide address pools.
//!
//! Servers never change in the background. Each one carries at most one pending
//! operation with start and end times; what a client sees is computed from the clock
//! when it looks ([`Server::phase`]), and a finished operation is applied
//! ([`World::settle`]) at the start of every compute request. So a simulator with a zero
//! delay is deterministic: the next read already shows the final state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, TimeZone, Utc};
use rand::Rng;
use sha2::{Digest, Sha224};

use super::SimAccount;
use super::catalog::{self, OsType};

/// Locks a mutex, ignoring poisoning: every critical section leaves the data consistent
/// before anything that could panic, and the simulator must keep answering.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Most servers a tenant may have (Nova's default instance quota is 10; TOAST's is
/// larger). Also bounds the simulator's memory.
pub(crate) const INSTANCE_QUOTA: usize = 50;
/// Deleted servers kept per tenant for `changes-since` listings.
const TOMBSTONES_KEPT: usize = 200;
/// Key pairs and snapshot images a tenant may hold (bounds memory).
pub(crate) const KEYPAIR_QUOTA: usize = 100;
pub(crate) const IMAGE_QUOTA: usize = 50;
/// Volumes a tenant may hold (root volumes not deleted with their server and blank
/// volumes accumulate; this bounds them).
pub(crate) const VOLUME_QUOTA: usize = 200;

#[derive(Clone)]
pub(crate) struct Token {
    pub tenant_id: String,
    pub user_id: String,
    pub issued: DateTime<Utc>,
    pub expires: DateTime<Utc>,
}

pub(crate) struct Keypair {
    pub id: u64,
    pub name: String,
    pub public_key: String,
    pub fingerprint: String,
    pub created_at: DateTime<Utc>,
}

pub(crate) struct Volume {
    pub id: String,
    /// The server it is attached to, if any ("in-use").
    pub attached_to: Option<String>,
}

pub(crate) struct Image {
    pub id: String,
    pub name: String,
    pub os_type: OsType,
    pub min_disk: u32,
    pub min_ram: u32,
    pub size: u64,
    pub metadata: BTreeMap<String, String>,
    /// `None` for the public base images, else the tenant of a snapshot.
    pub owner: Option<String>,
    pub created: DateTime<Utc>,
    /// A snapshot is `SAVING` until then, `ACTIVE` after.
    pub ready_at: DateTime<Utc>,
    /// The server a snapshot was taken from.
    pub server_id: Option<String>,
}

impl Image {
    pub fn visible_to(&self, tenant_id: &str) -> bool {
        self.owner.as_deref().is_none_or(|o| o == tenant_id)
    }
}

pub(crate) struct Port {
    pub id: &'static str,
    pub network: &'static str,
    pub ip: Ipv4Addr,
    pub mac: &'static str,
    pub device: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum VmState {
    Building,
    Active,
    Stopped,
    Resized,
    Error,
    Deleted,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Building => "building",
            VmState::Active => "active",
            VmState::Stopped => "stopped",
            VmState::Resized => "resized",
            VmState::Error => "error",
            VmState::Deleted => "deleted",
        }
    }
}

/// An operation in progress on a server.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Build,
    Start,
    Stop,
    Reboot {
        hard: bool,
    },
    /// Migrating until `verify_from`, then `VERIFY_RESIZE` until the pending end, when
    /// TOAST confirms it by itself.
    Resize {
        new_flavor: String,
        verify_from: DateTime<Utc>,
        back_to: VmState,
    },
    RevertResize {
        shown_flavor: String,
        back_to: VmState,
    },
    Snapshot,
    Delete,
}

#[derive(Clone, Debug)]
pub(crate) struct Pending {
    pub op: Op,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Pending {
    fn in_first_half(&self, now: DateTime<Utc>) -> bool {
        let half = self.start + (self.end - self.start) / 2;
        now < half
    }
}

pub(crate) struct Nic {
    pub network_name: &'static str,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub floating: Option<Ipv4Addr>,
    /// Set when the NIC uses a pre-created port (which outlives the server).
    pub port_id: Option<&'static str>,
}

pub(crate) struct Attachment {
    pub volume_id: String,
    pub device: String,
    pub root: bool,
    pub delete_on_termination: bool,
}

pub(crate) struct Server {
    /// Creation order; lists are newest first.
    pub seq: u64,
    pub id: String,
    pub name: String,
    pub tenant_id: String,
    pub user_id: String,
    pub image_id: String,
    pub flavor_id: String,
    pub key_name: Option<String>,
    pub az: String,
    pub host: String,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    pub launched_at: Option<DateTime<Utc>>,
    pub terminated_at: Option<DateTime<Utc>>,
    pub security_groups: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub nics: Vec<Nic>,
    pub attachments: Vec<Attachment>,
    pub disk_config: String,
    pub vm: VmState,
    pub power: u8,
    pub pending: Option<Pending>,
}

/// What a client sees of a server's state at one instant.
pub(crate) struct Phase {
    pub status: &'static str,
    pub vm: VmState,
    pub task: Option<&'static str>,
    pub power: u8,
    pub flavor_id: String,
}

/// Nova's mapping of (vm_state, task_state) to the API `status`.
fn status_of(vm: VmState, task: Option<&str>) -> &'static str {
    let resizing = matches!(
        task,
        Some("resize_prep" | "resize_migrating" | "resize_migrated" | "resize_finish")
    );
    match vm {
        VmState::Building => "BUILD",
        VmState::Active => match task {
            Some("rebooting") => "REBOOT",
            Some("reboot_started_hard") => "HARD_REBOOT",
            _ if resizing => "RESIZE",
            _ => "ACTIVE",
        },
        VmState::Stopped => match task {
            Some("reboot_started_hard") => "HARD_REBOOT",
            _ if resizing => "RESIZE",
            _ => "SHUTOFF",
        },
        VmState::Resized => match task {
            Some("resize_reverting") => "REVERT_RESIZE",
            _ => "VERIFY_RESIZE",
        },
        VmState::Error => match task {
            Some("reboot_started_hard") => "HARD_REBOOT",
            _ => "ERROR",
        },
        VmState::Deleted => "DELETED",
    }
}

impl Server {
    pub fn phase(&self, now: DateTime<Utc>) -> Phase {
        let mut vm = self.vm;
        let mut flavor = self.flavor_id.clone();
        let task = match &self.pending {
            None => None,
            Some(p) => match &p.op {
                Op::Build => Some(if p.in_first_half(now) {
                    "scheduling"
                } else {
                    "spawning"
                }),
                Op::Start => Some("powering-on"),
                Op::Stop => Some("powering-off"),
                Op::Reboot { hard: false } => Some("rebooting"),
                Op::Reboot { hard: true } => Some("reboot_started_hard"),
                Op::Resize {
                    new_flavor,
                    verify_from,
                    ..
                } => {
                    if now < *verify_from {
                        Some("resize_migrating")
                    } else {
                        vm = VmState::Resized;
                        flavor = new_flavor.clone();
                        None
                    }
                }
                Op::RevertResize { shown_flavor, .. } => {
                    vm = VmState::Resized;
                    flavor = shown_flavor.clone();
                    Some("resize_reverting")
                }
                Op::Snapshot => Some(if p.in_first_half(now) {
                    "image_snapshot"
                } else {
                    "image_uploading"
                }),
                Op::Delete => Some("deleting"),
            },
        };
        let power = if vm == VmState::Building {
            0
        } else {
            self.power
        };
        Phase {
            status: status_of(vm, task),
            vm,
            task,
            power,
            flavor_id: flavor,
        }
    }

    /// Applies a finished pending operation. Returns true when the server is now gone.
    fn settle(&mut self, now: DateTime<Utc>) -> bool {
        let Some(p) = self.pending.clone() else {
            return false;
        };
        if now < p.end {
            return false;
        }
        self.pending = None;
        self.updated = p.end;
        match p.op {
            Op::Build => {
                self.vm = VmState::Active;
                self.power = 1;
                self.launched_at = Some(p.end);
            }
            Op::Start | Op::Reboot { .. } => {
                self.vm = VmState::Active;
                self.power = 1;
            }
            Op::Stop => {
                self.vm = VmState::Stopped;
                self.power = 4;
            }
            Op::Resize {
                new_flavor,
                verify_from,
                back_to,
            } => {
                self.flavor_id = new_flavor;
                self.vm = back_to;
                self.launched_at = Some(verify_from);
            }
            Op::RevertResize { back_to, .. } => self.vm = back_to,
            Op::Snapshot => {}
            Op::Delete => {
                self.vm = VmState::Deleted;
                self.power = 0;
                self.terminated_at = Some(p.end);
                return true;
            }
        }
        false
    }

    /// Nova's hostId: sha224 of project id and host name.
    pub fn host_id(&self) -> String {
        let digest = Sha224::digest(format!("{}{}", self.tenant_id, self.host));
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn is_deleting(&self) -> bool {
        matches!(self.pending, Some(Pending { op: Op::Delete, .. }))
    }
}

pub(crate) struct Tenant {
    pub keypairs: Vec<Keypair>,
    pub servers: Vec<Server>,
    pub tombstones: Vec<Server>,
    pub volumes: Vec<Volume>,
    pub security_groups: Vec<String>,
}

impl Tenant {
    pub fn server(&self, id: &str) -> Option<&Server> {
        self.servers.iter().find(|s| s.id == id)
    }

    pub fn server_mut(&mut self, id: &str) -> Option<&mut Server> {
        self.servers.iter_mut().find(|s| s.id == id)
    }
}

pub(crate) struct World {
    pub tokens: HashMap<String, Token>,
    pub tenants: BTreeMap<String, Tenant>,
    pub images: Vec<Image>,
    pub ports: Vec<Port>,
    /// Fixed IPs in use (by servers or by pre-created ports).
    pub used_ips: HashSet<Ipv4Addr>,
    /// Floating IP -> (tenant, server id).
    pub floating: HashMap<Ipv4Addr, (String, String)>,
    pub next_keypair_id: u64,
    pub next_seq: u64,
}

impl World {
    pub fn new(accounts: &[SimAccount]) -> World {
        let base_created = Utc
            .with_ymd_and_hms(2020, 7, 21, 0, 0, 0)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut tenants = BTreeMap::new();
        for a in accounts {
            tenants
                .entry(a.tenant_id.clone())
                .or_insert_with(|| Tenant {
                    keypairs: Vec::new(),
                    servers: Vec::new(),
                    tombstones: Vec::new(),
                    volumes: catalog::seeded_volume_ids(&a.tenant_id)
                        .into_iter()
                        .map(|id| Volume {
                            id,
                            attached_to: None,
                        })
                        .collect(),
                    security_groups: catalog::SECURITY_GROUPS
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                });
        }
        let images = catalog::BASE_IMAGES
            .iter()
            .map(|b| Image {
                id: b.id.to_string(),
                name: b.name.to_string(),
                os_type: b.os_type,
                min_disk: b.min_disk,
                min_ram: b.min_ram,
                size: b.size,
                metadata: b.metadata_map(),
                owner: None,
                created: base_created,
                ready_at: base_created,
                server_id: None,
            })
            .collect();
        let ports: Vec<Port> = catalog::SEED_PORTS
            .iter()
            .map(|p| Port {
                id: p.id,
                network: p.network,
                ip: p.ip,
                mac: p.mac,
                device: None,
            })
            .collect();
        let used_ips = ports.iter().map(|p| p.ip).collect();
        World {
            tokens: HashMap::new(),
            tenants,
            images,
            ports,
            used_ips,
            floating: HashMap::new(),
            next_keypair_id: 1,
            next_seq: 1,
        }
    }

    /// Applies every finished operation; deleted servers release their addresses and
    /// volumes and are kept as tombstones for `changes-since`.
    pub fn settle(&mut self, now: DateTime<Utc>) {
        let mut released: Vec<Server> = Vec::new();
        for tenant in self.tenants.values_mut() {
            let mut i = 0;
            while i < tenant.servers.len() {
                if tenant.servers[i].settle(now) {
                    let mut gone = tenant.servers.remove(i);
                    for att in gone.attachments.drain(..) {
                        if att.root && att.delete_on_termination {
                            tenant.volumes.retain(|v| v.id != att.volume_id);
                        } else if let Some(v) =
                            tenant.volumes.iter_mut().find(|v| v.id == att.volume_id)
                        {
                            v.attached_to = None;
                        }
                    }
                    released.push(gone);
                } else {
                    i += 1;
                }
            }
        }
        for mut gone in released {
            for nic in gone.nics.drain(..) {
                if let Some(fip) = nic.floating {
                    self.floating.remove(&fip);
                }
                match nic.port_id {
                    Some(port_id) => {
                        if let Some(p) = self.ports.iter_mut().find(|p| p.id == port_id) {
                            p.device = None;
                        }
                    }
                    None => {
                        self.used_ips.remove(&nic.ip);
                    }
                }
            }
            if let Some(tenant) = self.tenants.get_mut(&gone.tenant_id) {
                tenant.tombstones.push(gone);
                if tenant.tombstones.len() > TOMBSTONES_KEPT {
                    tenant.tombstones.remove(0);
                }
            }
        }
    }

    pub fn image(&self, tenant_id: &str, id: &str) -> Option<&Image> {
        self.images
            .iter()
            .find(|i| i.id == id && i.visible_to(tenant_id))
    }

    pub fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }
}

/// A random MAC in OpenStack's `fa:16:3e` range.
pub(crate) fn random_mac() -> String {
    let mut rng = rand::rng();
    let b: [u8; 3] = rng.random();
    format!("fa:16:3e:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}
