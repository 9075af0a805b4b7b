//! The bdev registry's promises (SPEC §2 "Registry", "Descriptors"): unique names and aliases,
//! look-up by either, registration order, read-only/read-write descriptors, claims, statistics.
//! Written for the mutants cargo-mutants found missed in `src/bdev/registry.rs` (issue 12); the tests
//! sit in a module named `bdev` so that `scripts/mutants.sh`'s `bdev::` filter runs them.

mod bdev {
    use std::sync::Arc;

    use vblkd::bdev::malloc::MallocBdev;
    use vblkd::bdev::qos::QosLimits;
    use vblkd::bdev::{BdevError, BdevIo, IoVecs, Registry};

    fn malloc(name: &str) -> Arc<MallocBdev> {
        Arc::new(MallocBdev::new(name, 1 << 20, 512).expect("malloc"))
    }

    #[test]
    fn registry_names_aliases_and_lookup() {
        let reg = Registry::new();
        reg.register(malloc("a")).expect("register a");
        reg.register(malloc("b")).expect("register b");
        assert!(matches!(reg.register(malloc("a")), Err(BdevError::Exists(n)) if n == "a"));
        assert_eq!(reg.names(), vec!["a".to_string(), "b".to_string()], "registration order");
        assert_eq!(reg.get("a").expect("get a").info().name, "a");
        assert!(reg.get("zz").is_none());

        reg.add_alias("a", "disk-a").expect("alias");
        assert_eq!(reg.get("disk-a").expect("by alias").info().name, "a");
        assert_eq!(reg.open("disk-a", false).expect("open by alias").info().name, "a");
        assert!(matches!(reg.add_alias("b", "disk-a"), Err(BdevError::Exists(_))), "alias taken");
        assert!(matches!(reg.add_alias("b", "a"), Err(BdevError::Exists(_))), "alias = a name");
        assert!(matches!(reg.add_alias("zz", "x"), Err(BdevError::NotFound(_))));
        assert_eq!(reg.names().len(), 2, "aliases are not names");

        reg.unregister("disk-a").expect("unregister by alias");
        assert_eq!(reg.names(), vec!["b".to_string()], "only the removed bdev leaves the order");
        assert!(reg.get("a").is_none() && reg.get("disk-a").is_none(), "name and alias both gone");
        assert!(reg.get("b").is_some());
    }

    #[test]
    fn descriptors_claims_and_statistics() {
        let reg = Registry::new();
        reg.register(malloc("c")).expect("register");
        let ro = reg.open("c", false).expect("ro");
        let mut rw = reg.open("c", true).expect("rw");
        assert!(!ro.writable());
        assert!(rw.writable());

        assert_eq!(reg.claimed_by("c").expect("known"), None);
        assert!(matches!(reg.claimed_by("zz"), Err(BdevError::NotFound(_))));
        rw.claim("ftl").expect("first claim");
        assert_eq!(reg.claimed_by("c").expect("known").as_deref(), Some("ftl"), "who holds the claim");
        let mut other = reg.open("c", false).expect("read-only opens still work");
        assert!(matches!(other.claim("cache"), Err(BdevError::Claimed { .. })), "second claim refused");
        assert!(
            matches!(reg.open("c", true), Err(BdevError::Claimed { .. })),
            "write open of a claimed bdev"
        );
        drop(rw);
        let _rw2 = reg.open("c", true).expect("the claim ends with its descriptor");
        assert_eq!(reg.claimed_by("c").expect("known"), None);

        let w = reg.open("c", true).expect("rw");
        let mut wch = w.channel().expect("channel");
        wch.submit(BdevIo::write(0, 2, IoVecs::from_slice(&[7u8; 1024]), 1));
        let mut done = Vec::new();
        while wch.poll(&mut done) == 0 {}
        assert_eq!(done[0].result, Ok(()));
        let s = ro.stats();
        assert_eq!((s.write_ops, s.write_bytes), (1, 1024), "bdev-wide statistics");
        let shared = reg.bdev_stats("c").expect("stats").snapshot();
        assert_eq!(shared.write_ops, 1, "the registry's shared statistics are the bdev's");
        // The QoS control the registry hands out is the one the bdev's channels obey.
        let limits = QosLimits { iops: 10_000, bps: 0 };
        reg.set_qos("c", limits).expect("set qos");
        assert_eq!(reg.control("c").expect("control").qos.limits(), limits);
        reg.set_qos("c", QosLimits::default()).expect("clear qos");
        let j = reg.stats_json();
        assert_eq!(j["c"]["write_ops"], serde_json::json!(1), "{j}");
        assert_eq!(j["c"]["write_bytes"], serde_json::json!(1024), "{j}");
    }
}
