//! The capture ruleset of a pod: one nftables table of our own (`inet ambient-mesh`), programmed
//! over netlink inside the pod's network namespace.
//!
//! Building the ruleset is pure ([`CaptureConfig`] -> netlink messages); [`install`] sends it as
//! one atomic batch that replaces any previous version, and [`remove`] deletes the table. Other
//! tables in the namespace (the CNI's, the app's) are never read or touched.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions,
    Hook, Immediate, InetHookNumber, ListAttribute, Meta, MetaKey, NfTablesMessage, Operator,
    Payload, Register, RuleAttribute, RuleMessage, TableAttribute, TableMessage, Verdict,
    VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily, NetfilterSubsystem,
};

use super::netlink::NetlinkSocket;
use super::netns::NetNs;
use super::{Error, Result};

/// The name of our table; `inet` so one table covers IPv4 and IPv6.
pub const TABLE_NAME: &str = "ambient-mesh";
/// The chain on the nat `output` hook (connections the pod opens).
pub const OUTPUT_CHAIN: &str = "output";
/// The chain on the nat `prerouting` hook (connections arriving at the pod).
pub const PREROUTING_CHAIN: &str = "prerouting";

/// Packet mark of ztunnel's own sockets, as Istio's ztunnel (1337).
pub const DEFAULT_MARK: u32 = 0x539;
/// The bits of the packet mark that carry [`DEFAULT_MARK`], as Istio (`0x539/0xfff`), so other
/// components may use the remaining bits.
pub const DEFAULT_MARK_MASK: u32 = 0xfff;
/// The address istio-cni SNATs kubelet probes to, so pods can tell them apart (IPv4).
pub const ISTIO_PROBE_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The address istio-cni SNATs kubelet probes to (IPv6).
pub const ISTIO_PROBE_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// Both hooks run at the priority of destination NAT (`NF_IP_PRI_NAT_DST`), like `nft`'s
/// `dstnat` and iptables' nat table.
const NAT_PRIORITY: i32 = -100;
/// `NF_ACCEPT`.
const VERDICT_ACCEPT: u32 = 1;
/// `NFPROTO_IPV4`, `NFPROTO_IPV6` as `meta nfproto` yields them.
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// `NFT_PAYLOAD_NETWORK_HEADER`, `NFT_PAYLOAD_TRANSPORT_HEADER`.
const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
/// The loopback device has this index in every namespace (`LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;
/// `enum nft_redir_attributes` in linux/netfilter/nf_tables.h.
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the redirect carries a port. Newer kernels set it
/// themselves when a port register is given; older ones need it spelled out.
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
/// `NFTNL_UDATA_RULE_COMMENT`: the TLV type `nft` uses for rule comments in user data.
const UDATA_RULE_COMMENT: u8 = 0;
/// `NFNL_SUBSYS_NFTABLES`, the resource id of batch begin/end messages.
const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// What the capture rules redirect and what they let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// The mark ztunnel puts on its own sockets (`SO_MARK`); packets carrying it are never
    /// redirected, which is how ztunnel's connections out of the pod avoid looping back.
    pub mark: u32,
    /// Which bits of the packet mark are compared with [`Self::mark`].
    pub mark_mask: u32,
    /// Sources whose connections reach the pod's ports directly: kubelet health probes, which
    /// arrive from the node (its IP, or Istio's 169.254.7.127 when probes are SNATed).
    pub probe_sources: Vec<IpAddr>,
    /// Whether DNS (UDP and TCP port 53, to any address but loopback) leaving the pod goes to
    /// [`Self::dns_port`], where ztunnel's DNS proxy listens on the pod's loopback
    /// (`DNS_CAPTURE`). The proxy's own upstream queries carry [`Self::mark`], so the first
    /// output rule lets them out instead of looping them back.
    pub redirect_dns: bool,
    /// Where outbound TCP is redirected (15001).
    pub outbound_port: u16,
    /// Where inbound plaintext TCP is redirected (15006).
    pub inbound_plaintext_port: u16,
    /// The HBONE listener in the pod (15008): inbound connections to it are not redirected.
    pub hbone_port: u16,
    /// The DNS proxy in the pod (15053).
    pub dns_port: u16,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            mark: DEFAULT_MARK,
            mark_mask: DEFAULT_MARK_MASK,
            probe_sources: vec![
                IpAddr::V4(ISTIO_PROBE_SOURCE_V4),
                IpAddr::V6(ISTIO_PROBE_SOURCE_V6),
            ],
            redirect_dns: false,
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            hbone_port: 15008,
            dns_port: 15053,
        }
    }
}

/// Installs (or replaces) the capture table in `netns`, atomically: the kernel applies the whole
/// batch or none of it, so the namespace never holds a partial ruleset.
pub fn install(netns: &NetNs, config: &CaptureConfig) -> Result<()> {
    let mut requests = replace_table_requests();
    requests.extend(ruleset_requests(config));
    execute(netns, "install the capture table", requests)
}

/// Removes the capture table from `netns`; succeeds when it is not there.
pub fn remove(netns: &NetNs) -> Result<()> {
    execute(netns, "remove the capture table", remove_table_requests())
}

/// Whether the capture table exists in `netns`.
pub fn is_installed(netns: &NetNs) -> Result<bool> {
    let nftables_error = |source| Error::Nftables {
        action: "look up the capture table".to_owned(),
        netns: netns.description().to_owned(),
        source,
    };
    netns.run(table_exists)?.map_err(nftables_error)
}

/// One nftables message of a batch, with what it does for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    message: NfTablesMessage,
    flags: u16,
    what: String,
}

/// Adding the table first makes the delete succeed whether or not it existed, and the delete
/// flushes every chain and rule of a previous version (`nft`'s atomic-replace idiom).
fn remove_table_requests() -> Vec<Request> {
    vec![
        Request {
            message: NfTablesMessage::NewTable(table()),
            flags: NLM_F_CREATE,
            what: format!("add table inet {TABLE_NAME}"),
        },
        Request {
            message: NfTablesMessage::DeleteTable(table()),
            flags: 0,
            what: format!("delete table inet {TABLE_NAME}"),
        },
    ]
}

fn replace_table_requests() -> Vec<Request> {
    let mut requests = remove_table_requests();
    requests.push(Request {
        message: NfTablesMessage::NewTable(table()),
        flags: NLM_F_CREATE,
        what: format!("create table inet {TABLE_NAME}"),
    });
    requests
}

fn table() -> TableMessage {
    TableMessage {
        attributes: vec![TableAttribute::Name(TABLE_NAME.to_owned())],
    }
}

/// The chains and rules, in order (Istio's in-pod capture model).
fn ruleset_requests(config: &CaptureConfig) -> Vec<Request> {
    let mut requests = vec![
        nat_chain(OUTPUT_CHAIN, InetHookNumber::LocalOut),
        nat_chain(PREROUTING_CHAIN, InetHookNumber::PreRouting),
    ];
    let mut rule = |chain: &str, comment: &str, expressions: Vec<Expr>| {
        requests.push(Request {
            message: NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(TABLE_NAME.to_owned()),
                    RuleAttribute::Chain(chain.to_owned()),
                    RuleAttribute::Expressions(expressions),
                    RuleAttribute::UserData(comment_udata(comment)),
                ],
            }),
            flags: NLM_F_CREATE | NLM_F_APPEND,
            what: format!("add rule to chain {chain} ({comment})"),
        });
    };

    // Connections the pod opens.
    rule(
        OUTPUT_CHAIN,
        "ztunnel's own marked sockets",
        [mark_matches(config.mark, config.mark_mask), vec![accept()]].concat(),
    );
    rule(
        OUTPUT_CHAIN,
        "loopback and the pod's own addresses",
        vec![
            meta(MetaKey::Oif),
            cmp_eq(LOOPBACK_IFINDEX.to_ne_bytes()),
            accept(),
        ],
    );
    rule(
        OUTPUT_CHAIN,
        "to 127.0.0.0/8",
        [
            nfproto_is(NFPROTO_IPV4),
            vec![payload(PAYLOAD_NETWORK, 16, 1), cmp_eq([127]), accept()],
        ]
        .concat(),
    );
    rule(
        OUTPUT_CHAIN,
        "to ::1",
        [
            nfproto_is(NFPROTO_IPV6),
            vec![
                payload(PAYLOAD_NETWORK, 24, 16),
                cmp_eq(Ipv6Addr::LOCALHOST.octets()),
                accept(),
            ],
        ]
        .concat(),
    );
    if config.redirect_dns {
        for (protocol, name) in [(IPPROTO_UDP, "udp"), (IPPROTO_TCP, "tcp")] {
            rule(
                OUTPUT_CHAIN,
                &format!("DNS over {name} to :{}", config.dns_port),
                [
                    l4proto_is(protocol),
                    destination_port_is(53),
                    redirect_to(config.dns_port),
                ]
                .concat(),
            );
        }
    }
    rule(
        OUTPUT_CHAIN,
        &format!("outbound TCP to :{}", config.outbound_port),
        [l4proto_is(IPPROTO_TCP), redirect_to(config.outbound_port)].concat(),
    );

    // Connections arriving at the pod.
    rule(
        PREROUTING_CHAIN,
        "from loopback",
        vec![
            meta(MetaKey::Iif),
            cmp_eq(LOOPBACK_IFINDEX.to_ne_bytes()),
            accept(),
        ],
    );
    for source in &config.probe_sources {
        let (nfproto, offset, octets) = match source {
            IpAddr::V4(ip) => (NFPROTO_IPV4, 12, ip.octets().to_vec()),
            IpAddr::V6(ip) => (NFPROTO_IPV6, 8, ip.octets().to_vec()),
        };
        let len = octets.len() as u32;
        rule(
            PREROUTING_CHAIN,
            &format!("probes from {source}"),
            [
                nfproto_is(nfproto),
                vec![
                    payload(PAYLOAD_NETWORK, offset, len),
                    cmp_eq(octets),
                    accept(),
                ],
            ]
            .concat(),
        );
    }
    rule(
        PREROUTING_CHAIN,
        &format!("HBONE on :{}", config.hbone_port),
        [
            l4proto_is(IPPROTO_TCP),
            destination_port_is(config.hbone_port),
            vec![accept()],
        ]
        .concat(),
    );
    rule(
        PREROUTING_CHAIN,
        &format!(
            "inbound plaintext TCP to :{}",
            config.inbound_plaintext_port
        ),
        [
            l4proto_is(IPPROTO_TCP),
            redirect_to(config.inbound_plaintext_port),
        ]
        .concat(),
    );
    requests
}

fn nat_chain(name: &str, hook: InetHookNumber) -> Request {
    Request {
        message: NfTablesMessage::NewChain(ChainMessage {
            attributes: vec![
                ChainAttribute::Table(TABLE_NAME.to_owned()),
                ChainAttribute::Name(name.to_owned()),
                ChainAttribute::Hook(vec![
                    Hook::Number(hook.into()),
                    Hook::Priority(NAT_PRIORITY as u32),
                ]),
                ChainAttribute::Type("nat".to_owned()),
                ChainAttribute::Policy(VERDICT_ACCEPT),
            ],
        }),
        flags: NLM_F_CREATE,
        what: format!("add nat chain {name}"),
    }
}

type Expr = ListAttribute<ExpressionAttribute>;

/// Loads a meta key into register 1.
fn meta(key: MetaKey) -> Expr {
    Expressions::Meta(vec![
        Meta::Key(key),
        Meta::DestinationRegister(Register::Reg1),
    ])
    .into()
}

/// Loads `len` bytes at `offset` of a header into register 1.
fn payload(base: u32, offset: u32, len: u32) -> Expr {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
    .into()
}

/// Compares register 1 with `data`; the rule stops here unless equal.
fn cmp_eq(data: impl AsRef<[u8]>) -> Expr {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(Operator::Equal),
        Cmp::Data(DataAttribute::Value(data.as_ref().to_vec())),
    ])
    .into()
}

fn accept() -> Expr {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
            Verdict::Other(VERDICT_ACCEPT),
        )])),
    ])
    .into()
}

/// `meta mark & mask == mark & mask`; meta values are in host byte order.
fn mark_matches(mark: u32, mask: u32) -> Vec<Expr> {
    vec![
        meta(MetaKey::Mark),
        Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Mask(DataAttribute::Value(mask.to_ne_bytes().to_vec())),
            Bitwise::Xor(DataAttribute::Value(0u32.to_ne_bytes().to_vec())),
        ])
        .into(),
        cmp_eq((mark & mask).to_ne_bytes()),
    ]
}

/// In an `inet` table, header offsets depend on the family, so address matches check it first.
fn nfproto_is(nfproto: u8) -> Vec<Expr> {
    vec![meta(MetaKey::Nfproto), cmp_eq([nfproto])]
}

fn l4proto_is(protocol: u8) -> Vec<Expr> {
    vec![meta(MetaKey::L4Proto), cmp_eq([protocol])]
}

/// The destination port (bytes 2-3 of the TCP/UDP header, network byte order).
fn destination_port_is(port: u16) -> Vec<Expr> {
    vec![payload(PAYLOAD_TRANSPORT, 2, 2), cmp_eq(port.to_be_bytes())]
}

/// `redirect to :port`: DNAT to the primary address of the incoming interface (prerouting) or
/// to loopback (output), keeping the original destination for `SO_ORIGINAL_DST`.
fn redirect_to(port: u16) -> Vec<Expr> {
    vec![
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Reg1),
            Immediate::Data(DataAttribute::Value(port.to_be_bytes().to_vec())),
        ])
        .into(),
        Expressions::Other {
            expression_type: "redir".to_owned(),
            attributes: vec![
                DefaultNla::new(
                    NFTA_REDIR_REG_PROTO_MIN,
                    u32::from(Register::Reg1).to_be_bytes().to_vec(),
                ),
                DefaultNla::new(
                    NFTA_REDIR_FLAGS,
                    NF_NAT_RANGE_PROTO_SPECIFIED.to_be_bytes().to_vec(),
                ),
            ],
        }
        .into(),
    ]
}

/// A rule comment as `nft list ruleset` shows it: one TLV (type, length, NUL-terminated text).
fn comment_udata(comment: &str) -> Vec<u8> {
    // Our comments are short constants; the cut only guards the one-byte length field.
    let text = &comment.as_bytes()[..comment.len().min(127)];
    let mut udata = vec![UDATA_RULE_COMMENT, (text.len() + 1) as u8];
    udata.extend_from_slice(text);
    udata.push(0);
    udata
}

/// Enters `netns`, sends `requests` as one batch and waits for the kernel's verdict on each.
fn execute(netns: &NetNs, action: &str, requests: Vec<Request>) -> Result<()> {
    netns
        .run(|| send_batch(&requests))?
        .map_err(|source| Error::Nftables {
            action: action.to_owned(),
            netns: netns.description().to_owned(),
            source,
        })
}

fn send_batch(requests: &[Request]) -> io::Result<()> {
    let socket = NetlinkSocket::open(netlink_sys::constants::NETLINK_NETFILTER)?;
    let mut messages = Vec::with_capacity(requests.len() + 2);
    messages.push(batch_control(ControlMessage::BatchBegin, 0));
    for (index, request) in requests.iter().enumerate() {
        let mut message = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            request.message.clone(),
        ));
        message.header.flags = NLM_F_REQUEST | NLM_F_ACK | request.flags;
        message.header.sequence_number = sequence_number(index);
        messages.push(message);
    }
    messages.push(batch_control(
        ControlMessage::BatchEnd,
        sequence_number(requests.len()),
    ));
    socket.send(&mut messages)?;

    // Every request asked for an ack. The kernel acks each one once the whole batch has been
    // applied, or answers the first failing one with an error and applies nothing.
    let mut pending = requests.len();
    while pending > 0 {
        for reply in socket.recv::<NetfilterMessage>()? {
            let NetlinkPayload::Error(error) = reply.payload else {
                continue;
            };
            let Some(code) = error.code else {
                pending = pending.saturating_sub(1);
                continue;
            };
            let what = reply
                .header
                .sequence_number
                .checked_sub(1)
                .and_then(|index| requests.get(index as usize))
                .map_or("the batch", |request| request.what.as_str());
            let os_error = io::Error::from_raw_os_error(-code.get());
            return Err(io::Error::new(
                os_error.kind(),
                format!("the kernel refused \"{what}\": {os_error}"),
            ));
        }
    }
    Ok(())
}

/// Sequence numbers: 0 for the batch begin, then 1.. for the requests.
fn sequence_number(index: usize) -> u32 {
    u32::try_from(index + 1).unwrap_or(u32::MAX)
}

fn batch_control(
    message: ControlMessage,
    sequence_number: u32,
) -> NetlinkMessage<NetfilterMessage> {
    let mut message = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        message,
    ));
    message.header.flags = NLM_F_REQUEST;
    message.header.sequence_number = sequence_number;
    message
}

/// Asks for our table by name: a reply means it exists, `ENOENT` that it does not.
fn table_exists() -> io::Result<bool> {
    let socket = NetlinkSocket::open(netlink_sys::constants::NETLINK_NETFILTER)?;
    let mut request = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
        NfTablesMessage::GetTable(table()),
    ));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    request.header.sequence_number = 1;
    socket.send(std::slice::from_mut(&mut request))?;
    let mut found = false;
    loop {
        for reply in socket.recv::<NetfilterMessage>()? {
            match reply.payload {
                NetlinkPayload::InnerMessage(message)
                    if message.subsys() == NetfilterSubsystem::NfTables =>
                {
                    found = true;
                }
                NetlinkPayload::Error(error) => {
                    return match error.code {
                        None => Ok(found),
                        Some(code) if -code.get() == nix::libc::ENOENT => Ok(false),
                        Some(_) => Err(error.to_io()),
                    };
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
