//! The test guest's `irq` workload: COM1's THR-empty interrupt (and the PIT's) routed through
//! the in-kernel IOAPIC to a counting CPL0 stub while the guest runs in ring 3 with IF set;
//! plus the cases that show the count is made of real deliveries (masked pin, IF clear).

#![allow(clippy::unwrap_used)]

mod common;

use common::{boot_testguest, kvm_available, Run};

/// The interrupt counts are taken over fixed windows in the guest: running these guests one at
/// a time keeps them from starving each other's vCPUs on a small host.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn irq(test: &str, params: &str) -> Option<Run> {
    if !kvm_available(test) {
        return None;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    Some(boot_testguest(
        &format!("console=ttyS0 tg.run=irq {params}"),
        &["--cpus", "2"],
    ))
}

fn count(run: &Run) -> u64 {
    run.tg()
        .get("irq_count")
        .unwrap_or_else(|| panic!("no irq_count line\n{run}"))
        .parse()
        .unwrap()
}

#[test]
fn irq_serial_interrupts_are_delivered_and_counted() {
    let Some(run) = irq("irq_serial_interrupts_are_delivered_and_counted", "") else {
        return;
    };
    run.assert_pass();
    let tg = run.tg();
    assert_eq!(
        tg.get("irq_vector").map(String::as_str),
        Some("36"),
        "{run}"
    );
    assert!(
        tg.get("irq_source")
            .is_some_and(|s| s.starts_with("serial irq=4 pin=4")),
        "{run}"
    );
    assert!(count(&run) >= 16, "{run}");
}

#[test]
fn irq_many_serial_interrupts_are_counted() {
    let Some(run) = irq("irq_many_serial_interrupts_are_counted", "tg.irq_count=500") else {
        return;
    };
    run.assert_pass();
    assert!(count(&run) >= 500, "{run}");
}

#[test]
fn irq_pit_interrupts_are_delivered() {
    let Some(run) = irq("irq_pit_interrupts_are_delivered", "tg.irq_source=pit") else {
        return;
    };
    run.assert_pass();
    assert_eq!(
        run.tg().get("irq_vector").map(String::as_str),
        Some("32"),
        "{run}"
    );
    assert!(count(&run) >= 16, "{run}");
}

#[test]
fn irq_masked_ioapic_pin_delivers_nothing() {
    let Some(run) = irq(
        "irq_masked_ioapic_pin_delivers_nothing",
        "tg.irq_mask=1 tg.irq_expect=none tg.timeout_ms=300",
    ) else {
        return;
    };
    run.assert_pass();
    assert_eq!(count(&run), 0, "{run}");
    assert_eq!(
        run.tg().get("irq_pending").map(String::as_str),
        Some("0"),
        "a masked pin must not reach the LAPIC\n{run}"
    );
}

#[test]
fn irq_masked_ioapic_pin_fails_when_interrupts_are_wanted() {
    let Some(run) = irq(
        "irq_masked_ioapic_pin_fails_when_interrupts_are_wanted",
        "tg.irq_mask=1 tg.timeout_ms=300",
    ) else {
        return;
    };
    let result = run.tg().get("result").cloned().unwrap_or_default();
    assert!(
        result.starts_with("fail reason=only 0 of 16 interrupts"),
        "{run}"
    );
    assert_eq!(run.status.code(), Some(0), "the guest still resets\n{run}");
}

#[test]
fn irq_with_if_clear_stays_pending_in_the_lapic() {
    let Some(run) = irq(
        "irq_with_if_clear_stays_pending_in_the_lapic",
        "tg.irq_if=0 tg.irq_expect=none tg.timeout_ms=300",
    ) else {
        return;
    };
    run.assert_pass();
    assert_eq!(count(&run), 0, "{run}");
    assert_eq!(
        run.tg().get("irq_pending").map(String::as_str),
        Some("1"),
        "the interrupt must reach the LAPIC and wait for IF\n{run}"
    );
}
