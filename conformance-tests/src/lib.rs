//! relayq's conformance suite: the executable form of the contract every
//! backend obeys.
//!
//! A backend's test file makes a [`Harness`] factory and expands
//! [`conformance_tests!`] once; that yields one `#[tokio::test]` per case,
//! so a failure names its case and cases run in parallel. A case added here
//! reaches every backend without touching their test files.
//!
//! ```ignore
//! async fn fresh() -> relayq_conformance::Harness {
//!     let clock = relayq_core::ManualClock::new(relayq_conformance::EPOCH);
//!     let backend = MyBackend::with_clock(std::sync::Arc::new(clock.clone()));
//!     relayq_conformance::Harness::new(std::sync::Arc::new(backend), clock)
//! }
//! relayq_conformance::conformance_tests!(fresh);
//! ```
//!
//! The per-area modules ([`push`], [`pull`], [`lease`], [`unique`],
//! [`observe`], [`clean`], [`wakeups`], [`worker`]) expose each case as a public async fn taking a
//! fresh [`Harness`], and [`run_all`] runs every case in sequence.
//! [`faults`] wraps a store to change one of its calls, for tests of how
//! the worker copes.

mod harness;

pub mod clean;
pub mod faults;
pub mod lease;
pub mod observe;
pub mod pull;
pub mod push;
pub mod unique;
pub mod wakeups;
pub mod worker;

pub use harness::{EPOCH, Harness};

/// Names every case once, as `area::case`, and hands the list to `$callback`.
/// [`conformance_tests!`] and [`run_all`] both expand from it, so neither can
/// miss a case.
#[doc(hidden)]
#[macro_export]
macro_rules! __for_each_case {
    ($callback:ident ! ($($args:tt)*)) => {
        $crate::$callback! { ($($args)*)
            push::push_then_get_round_trips_every_field,
            push::push_applies_defaults,
            push::push_batch_is_all_or_nothing,
            push::large_batches_round_trip_every_field,
            push::batches_alike_but_for_one_job_round_trip_every_field,
            push::invalid_job_fields_are_named_and_nothing_is_written,
            push::invalid_arguments_are_named,
            push::arguments_are_refused_just_past_their_bounds,
            push::hostile_strings_round_trip,
            push::run_at_is_stored_in_utc_microseconds,
            push::deep_json_round_trips_up_to_the_limit,
            push::numbers_read_back_as_written,
            push::huge_payloads_round_trip_and_rejections_touch_no_other_row,
            pull::pull_orders_by_priority_then_run_at_then_id,
            pull::pull_sets_the_lease_fields,
            pull::delayed_job_stays_invisible_until_due,
            pull::pull_judges_due_on_its_own_clock,
            pull::job_not_due_yet_holds_back_no_due_job_behind_it,
            pull::delayed_job_is_ordered_by_priority_once_due,
            pull::small_batches_take_due_jobs_in_pull_order_past_scheduled_ones,
            pull::expired_leases_take_their_place_in_pull_order,
            pull::pull_honours_batch_size_and_queues,
            pull::concurrent_pullers_receive_each_job_exactly_once,
            pull::concurrent_pullers_take_back_each_expired_lease_once,
            lease::expired_lease_is_pulled_again_with_a_new_token,
            lease::stale_lease_acknowledgements_fail_and_change_nothing,
            lease::acknowledgements_of_an_ended_lease_fail_and_change_nothing,
            lease::an_expired_lease_not_yet_taken_back_still_acknowledges,
            lease::the_sweep_takes_every_abandoned_last_attempt_whatever_the_batch,
            lease::the_sweep_leaves_a_live_last_attempt_alone,
            lease::extend_keeps_the_job_invisible_past_its_first_lease,
            lease::extend_batch_extends_the_held_and_names_the_lost,
            lease::retry_reschedules_after_the_delay,
            lease::retry_on_the_last_attempt_is_dead,
            lease::abandoned_last_attempt_is_dead_with_a_reason,
            lease::kill_is_dead_at_once,
            lease::release_gives_back_the_attempt_and_voids_the_lease,
            lease::complete_stores_the_result,
            lease::complete_batch_is_fenced_per_lease,
            unique::unique_key_dedupes_while_active,
            unique::unique_key_is_free_once_terminal,
            unique::unique_key_is_held_until_the_job_ends_every_way,
            unique::unique_key_dedupes_within_a_batch,
            unique::racing_pushes_of_one_key_create_one_job,
            observe::get_of_a_missing_job_is_none,
            observe::stats_count_per_queue_and_status,
            observe::list_filters_by_status_queue_and_kind,
            observe::list_pages_have_no_gaps_or_repeats,
            observe::list_walks_past_changes_between_pages,
            clean::clean_deletes_only_old_terminal_jobs,
            clean::clean_rejects_active_statuses,
            clean::clean_takes_any_cutoff,
            clean::clean_takes_jobs_stamped_at_the_ends_of_the_years,
            clean::ids_are_not_reused_after_clean,
            wakeups::push_wakes_a_subscriber,
            wakeups::push_has_signalled_in_process_subscribers_when_it_returns,
            wakeups::release_and_retry_due_at_once_wake_a_subscriber,
            wakeups::subscribe_rejects_bad_queue_names,
            worker::worker_retries_follow_the_backoff_schedule,
            worker::worker_retry_overrides_apply,
            worker::worker_retry_delays_round_up_to_whole_microseconds,
            worker::worker_retries_by_default_when_the_policy_panics,
            worker::worker_makes_outcome_writes_that_failed_transiently_again,
            worker::worker_marks_dead_after_max_attempts,
            worker::worker_kills_unusable_jobs_once,
            worker::worker_kills_a_job_whose_result_cannot_be_stored,
            worker::started_worker_kills_unusable_jobs_once,
            worker::worker_runs_jobs_that_fall_due_without_a_signal,
            worker::worker_times_out_a_slow_handler,
            worker::worker_times_out_a_started_handler_that_never_wakes,
            worker::worker_records_a_stopped_handler_that_panics_as_it_is_dropped,
            worker::worker_contains_a_busy_handler,
            worker::worker_contains_a_panic,
            worker::worker_contains_a_panic_before_the_handlers_future,
            worker::worker_renews_the_lease_of_a_long_job,
            worker::worker_discards_the_result_of_a_lost_lease,
            worker::worker_stops_a_handler_whose_lease_was_taken,
            worker::worker_runs_up_to_concurrency_jobs_at_once,
            worker::worker_wakes_up_on_push,
            worker::worker_hears_a_push_made_during_its_empty_pull,
            worker::worker_shutdown_report_counts_only_the_grace_period,
            worker::worker_stops_a_handler_no_renewal_reached_for_a_whole_lease,
            worker::worker_does_not_start_a_job_pulled_too_late_to_hold,
            worker::worker_renews_past_a_renewal_that_hangs,
            worker::worker_without_prefetch_pulls_for_free_slots_only,
            worker::worker_shutdown_finishes_in_flight_then_releases,
            worker::worker_shutting_down_hands_its_jobs_to_an_idle_one,
            worker::worker_pair_runs_every_job_exactly_once,
            worker::worker_drains_a_mixed_queue_exactly_once_within_concurrency,
            worker::worker_shutdown_releases_prefetched_jobs,
            worker::worker_shutdown_gives_up_failing_releases_at_its_deadline,
            worker::worker_gives_back_jobs_held_behind_a_busy_slot,
            worker::worker_renews_the_leases_of_prefetched_jobs,
            worker::worker_renews_a_long_job_leased_with_quick_ones,
            worker::worker_reports_completions_once_recorded,
        }
    };
}

/// Expands into one `#[tokio::test]` per conformance case, each calling
/// `$factory().await` for a fresh [`Harness`]. The calling crate needs
/// `tokio` (with `macros` and `rt-multi-thread`) as a dev-dependency.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::__for_each_case!(__emit_tests!($factory));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __emit_tests {
    (($factory:expr) $($area:ident :: $case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::$area::$case(($factory)().await).await;
            }
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __run_in_sequence {
    (($factory:expr) $($area:ident :: $case:ident),* $(,)?) => {
        $(
            $crate::$area::$case(($factory)().await).await;
        )*
    };
}

/// Runs every case in sequence, each on a fresh harness from `factory`.
/// Prefer [`conformance_tests!`], which names a failing case.
pub async fn run_all<F, Fut>(factory: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Harness>,
{
    __for_each_case!(__run_in_sequence!(factory));
}
