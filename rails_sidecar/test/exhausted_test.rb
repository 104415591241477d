require_relative "test_helper"
require_relative "probe_jobs"

class ExhaustedTest < Minitest::Test
  include SidecarTestHelpers

  def exhausted(job, error_class: "ArgumentError", error_message: "boom", run_hook: true, **extra)
    post_json("/jobs/exhausted", {"job" => job, "error_class" => error_class,
                                  "error_message" => error_message, "run_hook" => run_hook, **extra})
  end

  def fail_job(jid)
    {"class" => "FailJob", "args" => [1], "jid" => jid, "retry" => 2, "retry_count" => 2}
  end

  def test_hook_then_death_handlers
    jid = new_jid
    exhausted(fail_job(jid))
    assert_equal 200, last_response.status, last_response.body
    assert_equal({"status" => "ok", "hook_ran" => true, "discard" => false}, json)
    rows = runs(jid)
    assert_equal ["FailJob.exhausted", "death_handler"], rows.map(&:job_class), "hook first, then death handlers"
    assert_equal "ArgumentError: boom", rows[0].note, "exception rebuilt with its class and message"
    assert_equal "FailJob ArgumentError: boom", rows[1].note
  end

  # What gokiq sends for a dead job: the hook alone, then the death handlers alone.
  def test_one_job_exhausted_line_per_dead_job
    jid = new_jid
    exhausted(fail_job(jid), "death_handlers" => false)
    exhausted(fail_job(jid), run_hook: false)
    lines = log_lines.select { |l| l["jid"] == jid }
    assert_equal ["retries-exhausted hook ran", "job exhausted"], lines.map { |l| l["msg"] }
    assert_equal false, lines[0]["discard"]
    assert_equal 1, lines[1]["death_handlers"]
    refute(lines.any? { |l| l.key?("hook_ran") })
  end

  def test_no_line_for_a_hook_call_that_ran_nothing
    jid = new_jid
    exhausted({"class" => "NoopJob", "args" => [], "jid" => jid}, "death_handlers" => false)
    assert_equal({"status" => "ok", "hook_ran" => false, "discard" => false}, json)
    assert_empty(log_lines.select { |l| l["jid"] == jid })
  end

  def test_run_hook_false_only_runs_death_handlers
    jid = new_jid
    exhausted(fail_job(jid), run_hook: false)
    assert_equal({"status" => "ok", "hook_ran" => false, "discard" => false}, json)
    assert_equal ["death_handler"], runs(jid).map(&:job_class)
  end

  def test_death_handlers_false_only_runs_the_hook
    jid = new_jid
    exhausted(fail_job(jid), "death_handlers" => false)
    assert_equal({"status" => "ok", "hook_ran" => true, "discard" => false}, json)
    assert_equal ["FailJob.exhausted"], runs(jid).map(&:job_class)
  end

  def test_unknown_class_still_runs_death_handlers
    jid = new_jid
    exhausted({"class" => "Kernel", "args" => [], "jid" => jid}, error_class: "NameError", error_message: "nope")
    assert_equal 200, last_response.status
    assert_equal false, json["hook_ran"]
    assert_equal ["death_handler"], runs(jid).map(&:job_class)
    assert_equal "Kernel NameError: nope", runs(jid).first.note
  end

  def test_unloadable_error_class_becomes_runtime_error
    jid = new_jid
    exhausted(fail_job(jid), error_class: "Some::Missing::Error", error_message: "gone")
    assert_equal "RuntimeError: Some::Missing::Error: gone", runs(jid).first.note
    jid = new_jid
    exhausted(fail_job(jid), error_class: "File", error_message: "not an exception")
    assert_equal "RuntimeError: File: not an exception", runs(jid).first.note
  end

  # Sidekiq ignores the hook's return value before 7.2.0 (dead set, death handlers), skips the
  # dead set from 7.2.0, and the death handlers too from 7.2.0 to 8.0.6.
  def test_discard_from_hook_as_the_apps_sidekiq_does_it
    version = Gem::Version.new(Sidekiq::VERSION)
    job = {"class" => "DiscardingExhaustedJob", "args" => [], "jid" => new_jid}
    exhausted(job, "death_handlers" => false)
    discards = version >= Gem::Version.new("7.2.0")
    assert_equal({"status" => "ok", "hook_ran" => true, "discard" => discards}, json)
    exhausted(job, run_hook: false, "discarded" => discards)
    handlers_ran = !discards || version >= Gem::Version.new("8.0.7")
    assert_equal (handlers_ran ? ["death_handler"] : []), runs(job["jid"]).map(&:job_class)
  end

  def test_hook_error_is_logged_not_raised
    jid = new_jid
    exhausted({"class" => "RaisingExhaustedJob", "args" => [], "jid" => jid})
    assert_equal 200, last_response.status
    assert_equal true, json["hook_ran"]
    assert_equal ["death_handler"], runs(jid).map(&:job_class), "death handlers still run"
    assert(log_lines.any? { |l| l["level"] == "error" && l["error_message"] == "hook broke" })
  end

  def test_active_job_uses_wrapped_class_hook
    jid = new_jid
    job = {"class" => "ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper", "wrapped" => "AjRetryJob",
           "args" => [JSON.parse(JSON.generate(AjRetryJob.new(1).serialize))], "jid" => jid}
    exhausted(job, error_message: "aj boom")
    assert_equal true, json["hook_ran"]
    assert_equal ["AjRetryJob.exhausted", "death_handler"], runs(jid).map(&:job_class)
  end

  def test_bad_requests_and_auth
    post_json("/jobs/exhausted", "[]")
    assert_equal 400, last_response.status
    post_json("/jobs/exhausted", {"job" => "x"})
    assert_equal 400, last_response.status
    post_json("/jobs/exhausted", {"job" => {"class" => "FailJob"}})
    assert_equal 400, last_response.status
    post_json("/jobs/exhausted", {"job" => fail_job(new_jid)}, false)
    assert_equal 401, last_response.status
  end

  def test_too_large
    @max_body_bytes = 50
    exhausted(fail_job(new_jid), error_message: "x" * 100)
    assert_equal 413, last_response.status
  end
end
