use netlink_packet_core::{NetlinkMessage, NetlinkPayload};

use super::*;

fn rules(requests: &[Request]) -> Vec<(&str, &[Expr], &str)> {
    requests
        .iter()
        .filter_map(|request| match &request.message {
            NfTablesMessage::NewRule(rule) => {
                let chain = rule.attributes.iter().find_map(|a| match a {
                    RuleAttribute::Chain(chain) => Some(chain.as_str()),
                    _ => None,
                })?;
                let expressions = rule.attributes.iter().find_map(|a| match a {
                    RuleAttribute::Expressions(e) => Some(e.as_slice()),
                    _ => None,
                })?;
                Some((chain, expressions, request.what.as_str()))
            }
            _ => None,
        })
        .collect()
}

fn redirect_port(expressions: &[Expr]) -> Option<u16> {
    let has_redir = expressions.iter().any(|e| {
        matches!(e, ListAttribute::Element(attributes)
            if attributes.contains(&ExpressionAttribute::Name("redir".to_owned())))
    });
    if !has_redir {
        return None;
    }
    expressions.iter().find_map(|e| match e {
        ListAttribute::Element(attributes) => attributes.iter().find_map(|a| match a {
            ExpressionAttribute::Data(Expressions::Immediate(immediate))
                if immediate.contains(&Immediate::DestinationRegister(Register::Reg1)) =>
            {
                immediate.iter().find_map(|i| match i {
                    Immediate::Data(DataAttribute::Value(port)) => {
                        Some(u16::from_be_bytes([port[0], port[1]]))
                    }
                    _ => None,
                })
            }
            _ => None,
        }),
        _ => None,
    })
}

#[test]
fn defaults_match_istio() {
    let config = CaptureConfig::default();
    assert_eq!(config.mark, 0x539);
    assert_eq!(config.mark_mask, 0xfff);
    assert_eq!(
        (
            config.outbound_port,
            config.inbound_plaintext_port,
            config.hbone_port,
            config.dns_port
        ),
        (15001, 15006, 15008, 15053)
    );
    assert!(!config.redirect_dns);
    assert!(
        config
            .probe_sources
            .contains(&"169.254.7.127".parse().expect("ip"))
    );
}

#[test]
fn replace_adds_then_deletes_then_creates_the_table() {
    let kinds: Vec<_> = replace_table_requests()
        .iter()
        .map(|r| r.message.message_type())
        .collect();
    use netlink_packet_netfilter::nftables::NfTablesMessageType as T;
    assert_eq!(kinds, [T::NewTable, T::DeleteTable, T::NewTable]);
    let kinds: Vec<_> = remove_table_requests()
        .iter()
        .map(|r| r.message.message_type())
        .collect();
    assert_eq!(kinds, [T::NewTable, T::DeleteTable]);
}

#[test]
fn last_rule_of_each_chain_redirects_tcp() {
    let requests = ruleset_requests(&CaptureConfig::default());
    let rules = rules(&requests);
    let last_in = |chain| {
        rules
            .iter()
            .rev()
            .find(|(c, _, _)| *c == chain)
            .map(|(_, e, _)| redirect_port(e))
    };
    assert_eq!(last_in(OUTPUT_CHAIN), Some(Some(15001)));
    assert_eq!(last_in(PREROUTING_CHAIN), Some(Some(15006)));
    // Everything before the last rule of a chain accepts: only one redirect per chain.
    let redirects = rules
        .iter()
        .filter(|(_, e, _)| redirect_port(e).is_some())
        .count();
    assert_eq!(redirects, 2);
}

#[test]
fn dns_redirect_is_opt_in_for_udp_and_tcp() {
    let without = rules(&ruleset_requests(&CaptureConfig::default()))
        .iter()
        .filter(|(_, e, _)| redirect_port(e) == Some(15053))
        .count();
    assert_eq!(without, 0);
    let config = CaptureConfig {
        redirect_dns: true,
        dns_port: 5353,
        ..CaptureConfig::default()
    };
    let requests = ruleset_requests(&config);
    let dns: Vec<_> = rules(&requests)
        .into_iter()
        .filter(|(_, e, _)| redirect_port(e) == Some(5353))
        .collect();
    assert_eq!(dns.len(), 2);
    assert!(dns.iter().all(|(chain, _, _)| *chain == OUTPUT_CHAIN));
    assert!(dns[0].2.contains("udp") && dns[1].2.contains("tcp"));
}

#[test]
fn every_probe_source_gets_an_accept_rule() {
    let config = CaptureConfig {
        probe_sources: vec![
            "10.0.0.7".parse().expect("ip"),
            "fd00::7".parse().expect("ip"),
        ],
        ..CaptureConfig::default()
    };
    let requests = ruleset_requests(&config);
    let probe_rules: Vec<_> = rules(&requests)
        .into_iter()
        .filter(|(_, _, what)| what.contains("probes from"))
        .collect();
    assert_eq!(probe_rules.len(), 2);
    assert!(probe_rules[0].2.contains("10.0.0.7"));
    assert!(probe_rules[1].2.contains("fd00::7"));
}

#[test]
fn comments_are_nft_user_data() {
    assert_eq!(comment_udata("ab"), [0, 3, b'a', b'b', 0]);
    let long = "x".repeat(300);
    let udata = comment_udata(&long);
    assert_eq!(udata[1] as usize, udata.len() - 2);
}

/// What we emit decodes back to the same messages, so lengths and nesting are consistent.
#[test]
fn batch_messages_round_trip() {
    let config = CaptureConfig {
        redirect_dns: true,
        ..CaptureConfig::default()
    };
    let mut requests = replace_table_requests();
    requests.extend(ruleset_requests(&config));
    for request in requests {
        let mut message = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            request.message.clone(),
        ));
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        let decoded = NetlinkMessage::<NetfilterMessage>::deserialize(&buffer).expect("decodes");
        let NetlinkPayload::InnerMessage(decoded) = decoded.payload else {
            panic!("not an nftables message: {decoded:?}");
        };
        assert_eq!(decoded.inner, request.message.into(), "{}", request.what);
    }
}
