//! What the two processes of an upgrade say to each other, in order:
//!
//! 1. predecessor: [`Hello`], with the listening sockets, the control socket and the
//!    metrics endpoint;
//! 2. successor: `Ready` once it accepts on them (or `Refused`, and it exits);
//! 3. predecessor: a `Connection` per live connection, with its two sockets; the successor
//!    answers each with `Taken` once it drives it: from then on it is the successor's;
//! 4. predecessor: `Done` when no connection is left to move, with its counters;
//! 5. successor: `Confirmed`; the predecessor exits once what could not move has drained.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::datapath::kernel::OffloadRecord;
use crate::datapath::meter::MeterRecord;
use crate::datapath::relay::HalfRecord;
use crate::lifecycle::LifecycleRecord;
use crate::stats::Totals;
use crate::vocab::DataPathKind;

/// Ids the predecessor may still hand out while its successor starts and already accepts.
pub const ID_GAP: u64 = 1 << 32;

/// Bumped whenever a message or record changes shape or meaning.
pub const PROTOCOL: u32 = 1;

/// What a successor checks before it takes anything over: the handoff protocol, and the
/// layout of the kernel maps it will reuse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub protocol: u32,
    pub map_layout: u32,
    /// The predecessor's version, for the log.
    pub version: String,
}

impl Stamp {
    pub fn this_build() -> Stamp {
        Stamp {
            protocol: PROTOCOL,
            map_layout: smartproxy_common::LAYOUT_VERSION,
            version: crate::VERSION.to_owned(),
        }
    }

    /// Why a successor built as `self` cannot take over from `predecessor`, if it cannot.
    pub fn incompatible(&self, predecessor: &Stamp) -> Option<String> {
        if predecessor.protocol != self.protocol {
            return Some(format!(
                "handoff protocol {} of smartproxy {} cannot be read by this build (protocol {}, smartproxy {})",
                predecessor.protocol, predecessor.version, self.protocol, self.version
            ));
        }
        if predecessor.map_layout != self.map_layout {
            return Some(format!(
                "the kernel maps of smartproxy {} have layout {}, this build expects {}",
                predecessor.version, predecessor.map_layout, self.map_layout
            ));
        }
        None
    }
}

/// The first message: what comes with it and how to read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub stamp: Stamp,
    pub pid: u32,
    /// The configured listen addresses, in the order of the descriptors; the control
    /// socket's descriptor follows them, then the metrics endpoint's if any.
    pub listeners: Vec<SocketAddr>,
    /// The configured metrics address, when its descriptor is included.
    pub metrics: Option<SocketAddr>,
    /// The predecessor's next connection id: the successor numbers its own connections
    /// from [`ID_GAP`] beyond it, so that no moved connection shares an id with one it
    /// accepted meanwhile.
    pub next_id: u64,
    /// The kernel data path, when the predecessor runs it: its pinned maps and the sizes
    /// they were made with, which the successor's configuration must not change.
    pub kernel: Option<KernelMaps>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelMaps {
    pub pins: PathBuf,
    /// `ebpf_ring_buffer_bytes`, `ebpf_max_connections` and `max_queued_bytes` as the maps
    /// were made.
    pub ring_buffer_bytes: u32,
    pub max_connections: u32,
    pub max_queued_bytes: u64,
    /// Whether the predecessor arms sockets' sock_ops callbacks at splice time
    /// (`Kernel::arms_at_splice`): then none of its sockets armed itself at the handshake,
    /// also none still waiting in a listener's backlog, and the successor must arm each
    /// socket it splices as well. Absent, so false, from a predecessor that arms at the
    /// handshake.
    #[serde(default)]
    pub arms_at_splice: bool,
}

/// One live connection. Its descriptors: client, backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    pub id: u64,
    /// The TCP peer (a load balancer, when `carried` is set).
    pub peer: SocketAddr,
    /// The client and destination a PROXY header named.
    pub carried: Option<(SocketAddr, SocketAddr)>,
    /// CLOCK_MONOTONIC nanoseconds at accept, and wall-clock milliseconds since 1970.
    pub started_ns: u64,
    pub started_unix_ms: u64,
    pub route: String,
    pub backend: SocketAddr,
    /// The target as configured (`host:port`), for its health counters.
    pub target: Option<String>,
    pub data_path: DataPathKind,
    pub meter: MeterRecord,
    pub lifecycle: LifecycleRecord,
    pub halves: [HalfRecord; 2],
    /// Bytes read and not yet written, per direction: the frame's tail holds them, client
    /// to backend first.
    pub pending: [usize; 2],
    /// The kernel's bookkeeping of a spliced connection.
    pub offload: Option<OffloadRecord>,
    /// On the adaptive path (`data_path = "auto"`): the moves made so far. Absent from a
    /// predecessor without that path.
    #[serde(default)]
    pub moves: Option<u32>,
    /// How often traffic took it up soon after it parked: its park delay doubles with
    /// each (`smartproxy/src/park/mod.rs`). 0 from a predecessor that does not send it.
    #[serde(default)]
    pub park_doublings: u8,
}

impl ConnectionRecord {
    /// Whether exactly one direction has ended, as the lifecycle says.
    pub fn lifecycle_half_open(&self) -> bool {
        self.halves[0].ended() != self.halves[1].ended()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
pub enum Message {
    Hello(Box<Hello>),
    Ready {
        pid: u32,
        /// Whether each socket this successor splices has its sock_ops callbacks on: it
        /// arms them itself (`Kernel::arms_at_splice`), or it does not splice. When not
        /// (false from a successor built before sockets were armed at splice time), the
        /// predecessor arms every unspliced socket it hands over.
        #[serde(default)]
        splices_armed: bool,
    },
    Refused {
        reason: String,
    },
    Connection(Box<ConnectionRecord>),
    Taken {
        id: u64,
    },
    Done {
        totals: Box<Totals>,
        /// The next connection id to hand out.
        next_id: u64,
        /// Connections that stay in the predecessor until they end (TLS it terminates).
        staying: u64,
    },
    Confirmed {
        connections: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_refuses_another_protocol_or_map_layout() {
        let this = Stamp::this_build();
        assert_eq!(this.incompatible(&this), None);
        let older = Stamp {
            protocol: PROTOCOL + 1,
            version: "0.0.9".to_owned(),
            ..this.clone()
        };
        let why = this.incompatible(&older).expect("another protocol");
        assert!(why.contains("0.0.9"), "{why}");
        let maps = Stamp {
            map_layout: this.map_layout + 1,
            ..this.clone()
        };
        assert!(this
            .incompatible(&maps)
            .is_some_and(|why| why.contains("layout")));
    }

    #[test]
    fn a_ready_without_splices_armed_reads_as_a_successor_that_needs_armed_sockets() {
        let older: Message = serde_json::from_str(r#"{"message":"ready","pid":7}"#)
            .expect("an older successor's ready reads");
        assert!(matches!(
            older,
            Message::Ready {
                pid: 7,
                splices_armed: false
            }
        ));
    }

    #[test]
    fn kernel_maps_without_arms_at_splice_read_as_a_predecessor_that_armed_at_the_handshake() {
        let older: KernelMaps = serde_json::from_str(
            r#"{"pins":"/sys/fs/bpf/x","ring_buffer_bytes":4096,"max_connections":8,"max_queued_bytes":65536}"#,
        )
        .expect("an older predecessor's maps read");
        assert!(!older.arms_at_splice);
    }

    #[test]
    fn a_record_without_the_newer_fields_reads_as_no_moves_and_no_park_doublings() {
        let lifecycle = crate::lifecycle::Lifecycle::new(
            std::sync::Arc::new(crate::config::LifecycleConfig::default()),
            std::time::Instant::now(),
        );
        let address: SocketAddr = ([127, 0, 0, 1], 8080).into();
        let record = ConnectionRecord {
            id: 7,
            peer: address,
            carried: None,
            started_ns: 1,
            started_unix_ms: 2,
            route: "web".to_owned(),
            backend: address,
            target: None,
            data_path: DataPathKind::Userspace,
            meter: crate::datapath::meter::Meter::default().to_record(),
            lifecycle: lifecycle.record(|_| 3),
            halves: [HalfRecord::default(); 2],
            pending: [0, 0],
            offload: None,
            moves: Some(4),
            park_doublings: 2,
        };
        let mut json = serde_json::to_value(&record).expect("a record serializes");
        let fields = json.as_object_mut().expect("a record is an object");
        assert!(fields.remove("moves").is_some() && fields.remove("park_doublings").is_some());
        let read: ConnectionRecord =
            serde_json::from_value(json).expect("an older predecessor's record reads");
        assert_eq!(
            read,
            ConnectionRecord {
                moves: None,
                park_doublings: 0,
                ..record
            }
        );
    }
}
