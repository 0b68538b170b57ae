use super::*;

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap()
}

fn registry() -> (
    Registry,
    Arc<BlockMetrics>,
    Arc<BlockMetrics>,
    Arc<VcpuMetrics>,
) {
    let mut r = Registry::default();
    let (a, b) = (
        Arc::new(BlockMetrics::default()),
        Arc::new(BlockMetrics::default()),
    );
    r.add_block("rootfs", a.clone());
    r.add_block("scratch", b.clone());
    r.add_net("eth0", Arc::new(NetMetrics::default()));
    r.set_entropy(Arc::new(EntropyMetrics::default()));
    r.set_legacy(
        Arc::new(SerialMetrics::default()),
        Arc::new(I8042Metrics::default()),
        Arc::new(AtomicU64::new(1234)),
    );
    let v = r.add_vcpu();
    (r, a, b, v)
}

#[test]
fn json_line_starts_with_the_timestamp_and_has_firecrackers_groups() {
    let (r, _, _, _) = registry();
    let line = r.json_line();
    assert!(line.starts_with("{\"utc_timestamp_ms\":"), "{line}");
    assert!(!line.contains('\n'));
    let v = parse(&line);
    assert!(v["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
    for group in [
        "api_server",
        "get_api_requests",
        "put_api_requests",
        "patch_api_requests",
        "block",
        "block_rootfs",
        "block_scratch",
        "net",
        "net_eth0",
        "vcpu",
        "entropy",
        "uart",
        "i8042",
        "latencies_us",
        "seccomp",
    ] {
        assert!(v[group].is_object(), "no {group} in {line}");
    }
    assert_eq!(v["latencies_us"]["guest_boot_time"], 1234);
    assert!(v["vsock"].is_null(), "no vsock device, no vsock group");
}

#[test]
fn json_counters_are_changes_since_the_last_line_and_aggregate_per_kind() {
    let (r, a, b, v) = registry();
    a.read_count.add(3);
    a.read_bytes.add(3 * 4096);
    b.read_count.add(2);
    v.exit_io_out.add(10);
    let first = parse(&r.json_line());
    assert_eq!(first["block_rootfs"]["read_count"], 3);
    assert_eq!(first["block_rootfs"]["read_bytes"], 12288);
    assert_eq!(first["block_scratch"]["read_count"], 2);
    assert_eq!(
        first["block"]["read_count"], 5,
        "the block group sums the drives"
    );
    assert_eq!(first["vcpu"]["exit_io_out"], 10);

    a.read_count.inc();
    let second = parse(&r.json_line());
    assert_eq!(second["block_rootfs"]["read_count"], 1);
    assert_eq!(second["block_scratch"]["read_count"], 0);
    assert_eq!(second["block"]["read_count"], 1);
    assert_eq!(second["vcpu"]["exit_io_out"], 0);
    // Set values are reported as they are, every time.
    assert_eq!(second["latencies_us"]["guest_boot_time"], 1234);
}

#[test]
fn prometheus_text_has_typed_cumulative_counters_with_labels() {
    let (r, a, _, v) = registry();
    a.write_count.add(7);
    v.exit_mmio_write.add(2);
    let _ = r.json_line(); // A JSON flush does not reset what Prometheus sees.
    a.write_count.inc();
    let text = r.prometheus();
    assert!(
        text.contains("# TYPE anvil_block_write_count_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("anvil_block_write_count_total{drive=\"rootfs\"} 8\n"),
        "{text}"
    );
    assert!(
        text.contains("anvil_block_write_count_total{drive=\"scratch\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("anvil_vcpu_exit_mmio_write_total{vcpu=\"0\"} 2\n"),
        "{text}"
    );
    assert!(text.contains("# TYPE anvil_guest_boot_time_us gauge\nanvil_guest_boot_time_us 1234\n"));
    // One TYPE line per metric name, each sample line "name{labels} value".
    let types: Vec<_> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
    let mut unique = types.clone();
    unique.dedup();
    assert_eq!(types.len(), unique.len());
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(name.starts_with("anvil_"), "{line}");
        value.parse::<u64>().unwrap();
    }
}

#[test]
fn label_values_are_escaped() {
    assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}

#[test]
fn api_paths_map_to_families() {
    let family = |p: &str| API_FAMILIES[api_family(p)].0;
    assert_eq!(family("/"), "instance_info");
    assert_eq!(family("/drives/rootfs"), "drive");
    assert_eq!(family("/drives"), "drive");
    assert_eq!(family("/drivesx"), "other");
    assert_eq!(family("/metrics/prometheus"), "prometheus");
    assert_eq!(family("/metrics"), "metrics");
    assert_eq!(family("/vm/config"), "vm_config");
    assert_eq!(family("/vm"), "vm");
    assert_eq!(family("/network-interfaces/eth0"), "network");
    assert_eq!(family("/machine-config?x=1"), "machine_cfg");
    assert_eq!(family("/nonsense"), "other");
}

#[test]
fn api_requests_and_failures_are_counted() {
    // The API counters are process-wide; this test alone uses the entropy family.
    let before =
        API.requests[api_method("PUT") * API_FAMILIES.len() + api_family("/entropy")].get();
    api().record("PUT", "/entropy", 204);
    api().record("PUT", "/entropy", 400);
    let slot = api_method("PUT") * API_FAMILIES.len() + api_family("/entropy");
    assert_eq!(API.requests[slot].get() - before, 2);
    assert!(API.fails[slot].get() >= 1);
    let text = prometheus(None);
    assert!(
        text.contains("anvil_api_requests_total{method=\"PUT\",family=\"entropy\"}"),
        "{text}"
    );
    let line = parse(&json_line(None));
    assert!(line["put_api_requests"]["entropy_count"].as_u64().is_some());
}

#[test]
fn writer_appends_one_line_per_flush_to_a_file_and_a_fifo() {
    let dir = std::env::temp_dir().join(format!("anvil-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("metrics.json");
    assert!(
        MetricsWriter::open(&file).is_err(),
        "the file must exist, as in Firecracker"
    );
    std::fs::write(&file, b"").unwrap();
    let (r, a, _, _) = registry();
    let mut w = MetricsWriter::open(&file).unwrap();
    a.flush_count.inc();
    w.flush(Some(&r)).unwrap();
    w.flush(Some(&r)).unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(parse(lines[0])["block_rootfs"]["flush_count"], 1);
    assert_eq!(parse(lines[1])["block_rootfs"]["flush_count"], 0);

    // A FIFO with no reader yet opens without blocking; a reader then gets whole lines.
    let fifo = dir.join("metrics.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut w = MetricsWriter::open(&fifo).unwrap();
    let mut reader = std::fs::File::open(&fifo).unwrap();
    w.flush(Some(&r)).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
    let got = String::from_utf8_lossy(&buf[..n]);
    assert!(
        got.ends_with("}\n") && got.starts_with("{\"utc_timestamp_ms\""),
        "{got}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
