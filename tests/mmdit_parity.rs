//! Parity with the reference implementation on every fixture folder (tests/common/parity.rs):
//! output, input gradients and every parameter gradient for both checkpoint layouts, the
//! sigma/timestep tables, and a 4-step CFG Euler trajectory. Fixture folders come from
//! `MMDIT_FIXTURES` (`:`-separated), defaulting to every folder in `../shared/fixtures/mmdit/`; a
//! new folder of the same format needs no code.

mod common;

#[test]
fn mmdit_matches_reference_on_every_fixture() {
    let mut failures = Vec::new();
    for dir in common::fixture_dirs() {
        failures.extend(common::parity::check_fixture(&dir));
    }
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}
