//! The Action catalog: every operation toastgate lets through.
//!
//! `Action` is the spine of toastgate: a closed catalog of semantic names
//! that both surfaces map onto (a v1.0 `{"action":"reboot"}` and a v2
//! `{"reboot":{..}}` are the same `instance.reboot`). Policy, rate limits,
//! audit and metrics speak `Action`, never raw URLs. `config` and `policy`
//! both read it; it depends on nothing of the crate.

use std::fmt;

macro_rules! actions {
    ($( $variant:ident => $name:literal, $mutating:literal; )*) => {
        /// Every operation toastgate lets through. A request that maps to none
        /// of these is refused.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Action { $( $variant, )* }

        impl Action {
            pub const ALL: &'static [Action] = &[ $( Action::$variant, )* ];

            /// The catalog name, e.g. `instance.reboot`.
            pub fn name(self) -> &'static str {
                match self { $( Action::$variant => $name, )* }
            }

            /// Whether it changes anything upstream (audited as such, and
            /// never retried blindly).
            pub fn is_mutating(self) -> bool {
                match self { $( Action::$variant => $mutating, )* }
            }
        }
    };
}

/// An Action's name as a label (logs, metrics, spans): "none" before the
/// request's Action is known.
pub fn label(action: Option<Action>) -> &'static str {
    action.map_or("none", Action::name)
}

actions! {
    FlavorList => "flavor.list", false;
    FlavorListDetail => "flavor.list_detail", false;
    FlavorGet => "flavor.get", false;
    ZoneList => "zone.list", false;
    KeypairList => "keypair.list", false;
    KeypairGet => "keypair.get", false;
    KeypairCreate => "keypair.create", true;
    KeypairDelete => "keypair.delete", true;
    InstanceList => "instance.list", false;
    InstanceListDetail => "instance.list_detail", false;
    InstanceGet => "instance.get", false;
    InstanceCreate => "instance.create", true;
    InstanceUpdate => "instance.update", true;
    InstanceDelete => "instance.delete", true;
    InstanceStart => "instance.start", true;
    InstanceStop => "instance.stop", true;
    InstanceReboot => "instance.reboot", true;
    InstanceResize => "instance.resize", true;
    InstanceCreateImage => "instance.create_image", true;
    InstanceAddSecurityGroup => "instance.add_security_group", true;
    InstanceRemoveSecurityGroup => "instance.remove_security_group", true;
    InstanceAddFloatingIp => "instance.add_floating_ip", true;
    InstanceRemoveFloatingIp => "instance.remove_floating_ip", true;
    VolumeAttachmentList => "volume.attachment_list", false;
    VolumeAttachmentGet => "volume.attachment_get", false;
    VolumeAttach => "volume.attach", true;
    VolumeDetach => "volume.detach", true;
}

impl Action {
    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.iter().copied().find(|a| a.name() == name)
    }

    /// The v2 server action whose body key selects this Action.
    pub fn from_v2_server_action(key: &str) -> Option<Action> {
        Some(match key {
            "os-start" => Action::InstanceStart,
            "os-stop" => Action::InstanceStop,
            "reboot" => Action::InstanceReboot,
            "resize" => Action::InstanceResize,
            "createImage" => Action::InstanceCreateImage,
            "addSecurityGroup" => Action::InstanceAddSecurityGroup,
            "removeSecurityGroup" => Action::InstanceRemoveSecurityGroup,
            "addFloatingIp" => Action::InstanceAddFloatingIp,
            "removeFloatingIp" => Action::InstanceRemoveFloatingIp,
            _ => return None,
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Named groups of Actions, usable in allow rules, rate-limit rules and
/// `rate_limit.fail_open`.
pub const GROUPS: &[(&str, &[Action])] = &[
    (
        "instance.read",
        &[
            Action::InstanceList,
            Action::InstanceListDetail,
            Action::InstanceGet,
        ],
    ),
    (
        "instance.power",
        &[
            Action::InstanceStart,
            Action::InstanceStop,
            Action::InstanceReboot,
        ],
    ),
    (
        "instance.write",
        &[
            Action::InstanceCreate,
            Action::InstanceUpdate,
            Action::InstanceDelete,
            Action::InstanceResize,
            Action::InstanceCreateImage,
        ],
    ),
    (
        "instance.network",
        &[
            Action::InstanceAddSecurityGroup,
            Action::InstanceRemoveSecurityGroup,
            Action::InstanceAddFloatingIp,
            Action::InstanceRemoveFloatingIp,
        ],
    ),
    (
        "catalog.read",
        &[
            Action::FlavorList,
            Action::FlavorListDetail,
            Action::FlavorGet,
            Action::ZoneList,
        ],
    ),
    ("keypair.read", &[Action::KeypairList, Action::KeypairGet]),
    (
        "keypair.write",
        &[Action::KeypairCreate, Action::KeypairDelete],
    ),
    (
        "volume.read",
        &[Action::VolumeAttachmentList, Action::VolumeAttachmentGet],
    ),
    (
        "volume.write",
        &[Action::VolumeAttach, Action::VolumeDetach],
    ),
];

/// Resolves an Action name, a group (`instance.read`, plus `read` and
/// `write` for every non-mutating / mutating Action), a prefix
/// (`keypair.*`) or `*`. `None` for anything unknown.
pub fn resolve_pattern(pattern: &str) -> Option<Vec<Action>> {
    let all = Action::ALL.iter().copied();
    let found: Vec<Action> = match pattern {
        "*" => all.collect(),
        "read" => all.filter(|a| !a.is_mutating()).collect(),
        "write" => all.filter(|a| a.is_mutating()).collect(),
        p if p.ends_with(".*") => {
            let prefix = &p[..p.len() - 1];
            all.filter(|a| a.name().starts_with(prefix)).collect()
        }
        p => {
            if let Some((_, actions)) = GROUPS.iter().find(|(g, _)| *g == p) {
                actions.to_vec()
            } else {
                Action::from_name(p).into_iter().collect()
            }
        }
    };
    (!found.is_empty()).then_some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut names: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Action::ALL.len());
        for a in Action::ALL {
            assert_eq!(Action::from_name(a.name()), Some(*a));
        }
        assert_eq!(Action::from_name("instance.explode"), None);
    }

    #[test]
    fn server_action_keys_map_to_mutating_actions() {
        for key in [
            "os-start",
            "os-stop",
            "reboot",
            "resize",
            "createImage",
            "addSecurityGroup",
            "removeSecurityGroup",
            "addFloatingIp",
            "removeFloatingIp",
        ] {
            let a = Action::from_v2_server_action(key).expect(key);
            assert!(a.is_mutating(), "{key}");
        }
        assert_eq!(Action::from_v2_server_action("lock"), None);
        assert!(!Action::InstanceList.is_mutating());
    }

    #[test]
    fn patterns_resolve_and_unknown_names_are_refused() {
        assert_eq!(resolve_pattern("*").unwrap().len(), Action::ALL.len());
        assert_eq!(resolve_pattern("keypair.*").unwrap().len(), 4);
        assert_eq!(
            resolve_pattern("instance.power").unwrap(),
            vec![
                Action::InstanceStart,
                Action::InstanceStop,
                Action::InstanceReboot
            ]
        );
        assert!(
            resolve_pattern("read")
                .unwrap()
                .iter()
                .all(|a| !a.is_mutating())
        );
        assert!(
            resolve_pattern("write")
                .unwrap()
                .iter()
                .all(|a| a.is_mutating())
        );
        assert_eq!(
            resolve_pattern("instance.reboot").unwrap(),
            vec![Action::InstanceReboot]
        );
        assert!(resolve_pattern("instance.explode").is_none());
        assert!(resolve_pattern("nothing.*").is_none());
        for (g, actions) in GROUPS {
            assert!(!actions.is_empty(), "{g}");
        }
    }

    /// A new Action cannot be left out of the groups teams are given.
    #[test]
    fn every_action_is_in_exactly_one_group() {
        for a in Action::ALL {
            let groups: Vec<&str> = GROUPS
                .iter()
                .filter(|(_, actions)| actions.contains(a))
                .map(|(g, _)| *g)
                .collect();
            assert_eq!(groups.len(), 1, "{a}: {groups:?}");
        }
    }
}
