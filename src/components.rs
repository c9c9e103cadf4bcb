//! The component list: every in-process component of the appliance, the facts
//! `up` plans with (start order, the variables that switch it, where it runs
//! by default), and how each is built from its section of the configuration.
//!
//! ```text
//!  ComponentKind::ALL ──facts()──▶ roles::plan (START_* variables, MASTER/SLAVE)
//!  build(kind, &Config, Appliance) ──▶ Arc<dyn Component>   (its own section + explicit inputs)
//! ```
//!
//! The only file that knows every component; adding one is a variant here,
//! its [`Facts`], its line in [`build`] and in [`Runs`](crate::config::Runs).

use std::sync::Arc;

use crate::component::{Appliance, Component};
use crate::config::{Config, FileConfig, Runs};
use crate::env;
use crate::{dns, lb, register, vpn};

/// An in-process component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ComponentKind {
    /// The DNS server.
    Dns,
    /// The HTTP/TCP load balancer.
    Lb,
    /// The WireGuard VPN.
    Vpn,
    /// The containers' registration in Consul.
    Register,
}

/// Where a component runs when no variable says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunsOn {
    /// Every host.
    Every,
    /// Hosts with `SLAVE=true` (where containers run).
    Slaves,
    /// Only where its section says `enabled = true`.
    WhereEnabled,
}

/// What `up` needs to know of a component before building it.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    /// Its unit name.
    pub name: &'static str,
    /// Start order (the built-in Consul agent is 10, programs default to 100).
    pub priority: u32,
    /// The variable that switches it on or off, and its PanteraS alias.
    pub switch: (&'static str, Option<&'static str>),
    /// Where it runs by default.
    pub runs_on: RunsOn,
    /// It waits for the built-in Consul agent's leader before starting.
    pub needs_consul: bool,
    /// Its section of `wayfinder status`, from its part of `/api/status`.
    pub terminal: Option<fn(&mut String, &serde_json::Value)>,
}

impl ComponentKind {
    /// Every component, in the order they are shown.
    pub const ALL: [ComponentKind; 4] = [
        ComponentKind::Dns,
        ComponentKind::Lb,
        ComponentKind::Vpn,
        ComponentKind::Register,
    ];

    /// Its facts. The vpn starts before the dns so the tunnel address exists
    /// when the dns binds it (it would bind anyway, with IP_FREEBIND), and so
    /// stops after it. Only the lb waits for Consul: it registers itself there
    /// and builds its table from the catalog; the dns serves zones and
    /// upstream names without Consul, so it starts at once. The register
    /// writes to Consul, so it waits too, and runs where containers do
    /// (slaves, as PanteraS ran registrator).
    pub fn facts(self) -> Facts {
        match self {
            ComponentKind::Dns => Facts {
                name: "dns",
                priority: 20,
                switch: (env::START_DNS, Some(env::START_DNSMASQ)),
                runs_on: RunsOn::Every,
                needs_consul: false,
                terminal: None,
            },
            ComponentKind::Lb => Facts {
                name: "lb",
                priority: 30,
                switch: (env::START_LB, Some(env::START_CONSUL_TEMPLATE)),
                runs_on: RunsOn::Slaves,
                needs_consul: true,
                terminal: None,
            },
            ComponentKind::Vpn => Facts {
                name: "vpn",
                priority: 15,
                switch: (env::START_VPN, None),
                runs_on: RunsOn::WhereEnabled,
                needs_consul: false,
                terminal: Some(vpn::page::terminal),
            },
            ComponentKind::Register => Facts {
                name: "register",
                priority: 40,
                switch: (env::START_REGISTRATOR, None),
                runs_on: RunsOn::Slaves,
                needs_consul: true,
                terminal: Some(register::component::terminal),
            },
        }
    }

    /// Its unit name.
    pub fn name(self) -> &'static str {
        self.facts().name
    }

    /// Whether its section says `enabled` (for [`RunsOn::WhereEnabled`]).
    pub fn enabled(self, config: &Config) -> bool {
        match self {
            ComponentKind::Vpn => config.vpn.enabled,
            ComponentKind::Dns | ComponentKind::Lb | ComponentKind::Register => true,
        }
    }

    /// Whether the file (after the environment) turns it on explicitly
    /// (`enabled = true`), valid or not.
    pub fn enabled_in(self, file: &FileConfig) -> bool {
        match self {
            ComponentKind::Vpn => file.vpn.enabled,
            ComponentKind::Dns | ComponentKind::Lb | ComponentKind::Register => false,
        }
    }

    /// Marks its section to be checked strictly.
    pub fn check_in(self, runs: &mut Runs) {
        match self {
            ComponentKind::Dns => runs.dns = true,
            ComponentKind::Lb => runs.lb = true,
            ComponentKind::Vpn => runs.vpn = true,
            ComponentKind::Register => runs.register = true,
        }
    }
}

/// The appliance of `config` and every component, whether this host starts
/// it or not (a component's value is cheap until it binds).
pub fn assemble(config: &Config) -> (Arc<Appliance>, Vec<Arc<dyn Component>>) {
    let appliance = Appliance::new(&config.consul, config.host_ip, config.own_listeners());
    let components = ComponentKind::ALL
        .into_iter()
        .map(|kind| build(kind, config, &appliance))
        .collect();
    (appliance, components)
}

/// Builds the component of `kind` from its own section and the appliance.
pub fn build(kind: ComponentKind, config: &Config, appliance: &Arc<Appliance>) -> Arc<dyn Component> {
    let consul = &config.consul;
    match kind {
        ComponentKind::Dns => Arc::new(dns::component::Dns::new(
            config.dns.clone(),
            consul.clone(),
            appliance.clone(),
        )),
        ComponentKind::Lb => Arc::new(lb::component::Lb::new(
            config.lb.clone(),
            consul.clone(),
            appliance.clone(),
        )),
        ComponentKind::Vpn => Arc::new(vpn::component::Vpn::new(
            config.vpn.clone(),
            vpn::ClientInputs::new(appliance.host_ip, &consul.domain, &config.source),
        )),
        ComponentKind::Register => Arc::new(register::component::Register::new(
            config.register.clone(),
            appliance.clone(),
        )),
    }
}

/// The components' own sections of `wayfinder status` (a terminal), from
/// their parts of `/api/status`.
pub fn terminal_sections(report: &serde_json::Value) -> String {
    let mut out = String::new();
    for kind in ComponentKind::ALL {
        let facts = kind.facts();
        if let Some(render) = facts.terminal {
            render(&mut out, &report[facts.name]);
        }
    }
    out
}
