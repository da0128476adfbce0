//! The Action catalog and authorization.
//!
//! `Action` is the spine of toastgate: a closed catalog of semantic names
//! that both surfaces map onto (a v1.0 `{"action":"reboot"}` and a v2
//! `{"reboot":{..}}` are the same `instance.reboot`). Policy, rate limits,
//! audit and metrics speak `Action`, never raw URLs.

use std::fmt;

use crate::config::Config;

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

actions! {
    FlavorList => "flavor.list", false;
    FlavorListDetail => "flavor.list_detail", false;
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

/// Why a caller may not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("team `{team}` is not configured in toastgate")]
    UnknownTeam { team: String },
    #[error("team `{team}` may not use project `{project}`")]
    ProjectNotAllowed { team: String, project: String },
}

/// Project scoping: a team may only use the projects listed for it.
pub fn authorize(
    config: &Config,
    team: &str,
    project_alias: &str,
    _action: Action,
) -> Result<(), Refusal> {
    let Some(t) = config.teams.get(team) else {
        return Err(Refusal::UnknownTeam {
            team: team.to_string(),
        });
    };
    if !t.projects.iter().any(|p| p == project_alias) {
        return Err(Refusal::ProjectNotAllowed {
            team: team.to_string(),
            project: project_alias.to_string(),
        });
    }
    Ok(())
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
}
