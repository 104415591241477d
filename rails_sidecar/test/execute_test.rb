require_relative "test_helper"
require_relative "probe_jobs"

class ExecuteTest < Minitest::Test
  include SidecarTestHelpers

  AJ_WRAPPER = "ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper"

  def aj_payload(job, wrapper: AJ_WRAPPER)
    {"class" => wrapper, "wrapped" => job.class.name, "queue" => job.queue_name, "retry" => true,
     "args" => [JSON.parse(JSON.generate(job.serialize))], "jid" => new_jid}
  end

  # --- 200 ---------------------------------------------------------------

  def test_ok_and_exact_argument_round_trip
    jid = new_jid
    args = [1, "héllo ✓ 日本 🎉", {"nested" => {"list" => [1.5, -0.1, 1e-7, 12345.678901234567], "nil" => nil, "t" => true}},
            "x" * 100_000, 0.1, 2**40]
    execute("class" => "HardJob", "args" => args, "jid" => jid, "queue" => "default", "retry" => true)
    assert_equal 200, last_response.status
    assert_equal "application/json", last_response.headers["Content-Type"]
    assert_equal "ok", json["status"]
    assert_kind_of Float, json["execution_time"]
    run = runs(jid).first
    assert_equal args, run.parsed_args
    assert_equal JSON.generate(args), run.args
    assert run.middleware, "ExampleServerMiddleware should wrap perform"
  end

  def test_execution_context
    ActiveRecord::Base.connection_pool.release_connection
    jid = new_jid
    execute("class" => "ProbeJob", "args" => [1, {"k" => "v"}], "jid" => jid, "cattr" => {"user_id" => 42},
            "tags" => ["t1"], "bid" => "b1", "wrapped" => nil)
    assert_equal 200, last_response.status, last_response.body
    seen = ProbeJob.seen
    assert_equal [1, {"k" => "v"}], seen[:args]
    assert_equal jid, seen[:jid], "jid set on the instance"
    assert seen[:executor_active], "Rails executor active during perform"
    assert seen[:middleware], "server middleware ran"
    assert_equal 42, seen[:user_id], "Current restored from cattr"
    assert seen[:connection_checked_out]
    assert_equal({class: "ProbeJob", jid: jid, bid: "b1", tags: ["t1"]}, seen[:context])
    # after the request: executor finished, connection back in the pool, Current reset
    refute Rails.application.executor.active?
    refute ActiveRecord::Base.connection_pool.active_connection?, "connection returned to the pool"
    assert_nil Current.user_id
    assert_nil Thread.current[:sidekiq_context]
  end

  # Sidekiq acknowledges a job a middleware answered with JobRetry::Skip, and retries nothing.
  def test_a_job_a_middleware_handled_elsewhere_is_done_not_failed
    execute("class" => "HandledElsewhereJob", "args" => [], "jid" => new_jid)
    assert_equal 200, last_response.status, last_response.body
    assert_equal "ok", json["status"]
  end

  # 7.3+: an iterable job stops between iterations once the process is stopping.
  def test_a_job_sees_the_sidecar_stopping_through_interrupted
    skip "Sidekiq #{Sidekiq::VERSION} has no Job#interrupted?" unless Sidekiq::Job.method_defined?(:interrupted?)
    stopping = GokiqSidecar::State.new(:ready)
    runner = GokiqSidecar::Runner.new(context: stopping)
    job = {"class" => "InterruptProbeJob", "args" => [], "jid" => new_jid}
    assert_equal "ok", runner.execute(InterruptProbeJob, job, "default").outcome
    assert_equal false, InterruptProbeJob.interrupted
    stopping.draining!
    assert_equal "ok", runner.execute(InterruptProbeJob, job, "default").outcome
    assert_equal true, InterruptProbeJob.interrupted
  end

  def test_current_attributes_reach_hard_job
    jid = new_jid
    execute("class" => "HardJob", "args" => [], "jid" => jid, "cattr" => {"user_id" => 7})
    assert_equal 200, last_response.status
    assert_equal "user_id=7", runs(jid).first.note
  end

  def test_namespaced_class
    jid = new_jid
    execute("class" => "Namespaced::InnerJob", "args" => ["n"], "jid" => jid)
    assert_equal 200, last_response.status, last_response.body
    assert_equal ["n"], runs(jid).first.parsed_args
  end

  def test_active_job_globalid_and_kwargs_with_both_wrapper_names
    person = Person.create!(name: "Ann")
    [AJ_WRAPPER, "Sidekiq::ActiveJob::Wrapper"].each do |wrapper|
      payload = aj_payload(GreetJob.new(person, greeting: "Hello", punctuation: "?"), wrapper: wrapper)
      execute(payload)
      assert_equal 200, last_response.status, last_response.body
      run = runs(payload["jid"]).first
      assert_equal "Hello, Ann?", run.note, "GlobalID resolved, kwargs intact"
      assert run.middleware
    end
    payload = aj_payload(GreetJob.new(person, greeting: "Hi"))
    execute(payload)
    assert_equal "Hi, Ann!", runs(payload["jid"]).first.note, "default kwarg"
  end

  def test_queue_header_and_log_line
    jid = new_jid
    header "X-Gokiq-Queue", "critical"
    execute("class" => "NoopJob", "args" => ["secret-arg"], "jid" => jid, "queue" => "default")
    assert_equal 200, last_response.status
    line = log_lines.find { |l| l["jid"] == jid }
    assert_equal "job done", line["msg"]
    assert_equal "info", line["level"]
    assert_equal "critical", line["queue"]
    assert_equal "ok", line["outcome"]
    assert_equal "NoopJob", line["class"]
    assert line["ts"] && line["duration"]
    refute_includes log_io.string, "secret-arg"
    refute_includes log_io.string, TOKEN
  end

  def test_queue_defaults
    execute("class" => "NoopJob", "args" => [], "jid" => (j1 = new_jid), "queue" => "low")
    execute("class" => "NoopJob", "args" => [], "jid" => (j2 = new_jid))
    assert_equal "low", log_lines.find { |l| l["jid"] == j1 }["queue"]
    assert_equal "default", log_lines.find { |l| l["jid"] == j2 }["queue"]
  end

  # --- 500 ---------------------------------------------------------------

  def test_failed_job_reports_error_and_class_retry
    execute("class" => "FailJob", "args" => [1], "jid" => new_jid, "retry" => 2, "backtrace" => 5)
    assert_equal 500, last_response.status
    assert_equal "failed", json["status"]
    assert_equal "ArgumentError", json["error_class"]
    assert_equal "boom", json["error_message"]
    assert_match(/fail_job\.rb/, json["backtrace"].first)
    assert_nil json["retry_in"]
    assert_equal 2, json["class_retry"]
    assert_kind_of Float, json["execution_time"]
    assert_equal "failed", log_lines.last["outcome"]
  end

  def test_class_retry_values
    { "NoRetryJob" => false, "RetryZeroJob" => 0, "NoDeadJob" => 0, "RetryInJob" => 3, "BinaryMessageJob" => true }.each do |klass, want|
      execute("class" => klass, "args" => ["delay"], "jid" => new_jid)
      assert_equal 500, last_response.status, klass
      assert_equal want, json["class_retry"], klass
    end
  end

  def test_retry_in_values
    { "delay" => 5, "discard" => "discard", "kill" => "kill" }.each do |mode, want|
      execute("class" => "RetryInJob", "args" => [mode], "jid" => new_jid, "retry" => 3)
      assert_equal 500, last_response.status
      assert_equal mode, json["error_message"]
      assert_equal want, json["retry_in"], mode
    end
  end

  def test_retry_in_gets_sidekiqs_count
    execute("class" => "CountingRetryJob", "args" => [], "jid" => new_jid)
    assert_equal 1, json["retry_in"], "first failure: count 0"
    execute("class" => "CountingRetryJob", "args" => [], "jid" => new_jid, "retry_count" => 2)
    assert_equal 31, json["retry_in"], "retry_count 2 in payload: count 3"
    assert_equal 7, json["class_retry"]
  end

  def test_retry_in_gets_the_job_hash_from_sidekiq_7_1
    execute("class" => "ThreeArgumentRetryInJob", "args" => [3], "jid" => new_jid, "retry_count" => 1)
    assert_equal 500, last_response.status
    if Gem::Version.new(Sidekiq::VERSION) >= Gem::Version.new("7.1")
      assert_equal 105, json["retry_in"], "block called with (count 2, exception, job)"
    else
      assert_equal 50, json["retry_in"], "block called with (count, exception), as Sidekiq < 7.1 does"
    end
  end

  def test_jobs_get_a_redis_pool_sized_to_the_sidecars_threads
    execute("class" => "RedisPoolJob", "args" => [], "jid" => new_jid)
    assert_equal 200, last_response.status, last_response.body
    # 6.x server mode: concurrency + 5; 7+: the default capsule's pool, of its concurrency.
    want = Sidekiq::VERSION.to_i >= 7 ? TEST_THREADS : TEST_THREADS + 5
    assert_equal want, RedisPoolJob.size
  end

  def test_backtrace_cleaned_as_sidekiq_does
    execute("class" => "FailJob", "args" => [], "jid" => new_jid)
    backtrace = json["backtrace"]
    if Gem::Version.new(Sidekiq::VERSION) >= Gem::Version.new("7.1")
      # Rails.backtrace_cleaner: app lines relative to Rails.root, gem lines gone.
      assert_match %r{\Aapp/jobs/fail_job\.rb:\d+}, backtrace.first
      assert(backtrace.none? { |l| l.include?("/gems/") }, backtrace.inspect)
    else
      assert_equal File.join(EXAMPLE_APP, "app/jobs/fail_job.rb"), backtrace.first.split(":").first
      assert(backtrace.any? { |l| l.include?("/gems/") }, "6.x keeps the full backtrace")
    end
  end

  def test_retry_in_null_when_block_raises_or_returns_zero
    execute("class" => "RaisingRetryInJob", "args" => [], "jid" => new_jid)
    assert_equal 500, last_response.status
    assert_nil json["retry_in"]
    execute("class" => "ZeroRetryInJob", "args" => [], "jid" => new_jid)
    assert_nil json["retry_in"]
  end

  def test_active_job_failure_uses_wrapped_class_hooks
    payload = aj_payload(AjRetryJob.new(1))
    payload["retry_count"] = 1
    execute(payload)
    assert_equal 500, last_response.status
    assert_equal "ArgumentError", json["error_class"]
    assert_equal "aj boom", json["error_message"]
    assert_equal 102, json["retry_in"]
    assert_equal 4, json["class_retry"]
    assert_equal "AjRetryJob", log_lines.last["class"]
  end

  def test_error_message_cut_and_scrubbed
    execute("class" => "BinaryMessageJob", "args" => [5000], "jid" => new_jid)
    assert_equal 500, last_response.status
    message = json["error_message"]
    assert_equal 10_000, message.length
    assert message.valid_encoding?
    assert_includes message, "ok"
  end

  # --- 400 / 401 / 413 ------------------------------------------------------

  def test_bad_requests
    ["not json", "[1,2]", "\"str\"", JSON.generate("args" => []), JSON.generate("class" => 5, "args" => []),
     JSON.generate("class" => "", "args" => []),
     JSON.generate("class" => "HardJob"), JSON.generate("class" => "HardJob", "args" => {"a" => 1})].each do |body|
      execute(body)
      assert_equal 400, last_response.status, body
      assert_equal "bad_request", json["status"]
      assert json["error_message"]
    end
  end

  def test_unauthorized
    execute({"class" => "HardJob", "args" => [], "jid" => (jid = new_jid)}, false)
    assert_equal 401, last_response.status
    assert_equal({"status" => "unauthorized"}, json)
    header "Authorization", "Bearer wrong"
    post "/jobs/execute", JSON.generate("class" => "HardJob", "args" => [])
    assert_equal 401, last_response.status
    header "Authorization", TOKEN # no "Bearer "
    post "/jobs/exhausted", "{}"
    assert_equal 401, last_response.status
    assert_empty runs(jid)
  end

  def test_open_routes_need_no_token
    get "/health"
    assert_equal 200, last_response.status
    assert_equal({"status" => "ok", "sidekiq_version" => Sidekiq::VERSION}, json)
    get "/ready"
    assert_equal 200, last_response.status
    get "/metrics"
    assert_equal 200, last_response.status
  end

  def test_too_large
    @max_body_bytes = 1000
    execute("class" => "HardJob", "args" => ["x" * 2000])
    assert_equal 413, last_response.status
    assert_equal({"status" => "too_large"}, json)
    # a lying (small) Content-Length: the bytes actually read are checked too
    authed
    post "/jobs/execute", {}, {"CONTENT_LENGTH" => "10", :input => JSON.generate("class" => "HardJob", "args" => ["x" * 2000])}
    assert_equal 413, last_response.status
    execute("class" => "NoopJob", "args" => [])
    assert_equal 200, last_response.status
  end

  # --- 422 ---------------------------------------------------------------

  def test_invalid_classes
    NotAJob.instantiated = false
    %w[Unknown Kernel File Object ActiveRecord::Base NotAJob Person HardJob::Nope Sidekiq::Worker
       hardjob Hard;Job Hard\ Job HardJob.new ::::HardJob Object::File __FILE__ GreetJob String].each do |name|
      execute("class" => name, "args" => [], "jid" => new_jid)
      assert_equal 422, last_response.status, name
      assert_equal "invalid_class", json["status"]
      assert_equal "NameError", json["error_class"]
      assert json["error_message"]
    end
    refute NotAJob.instantiated, "nothing instantiated"
    assert_equal "invalid_class", log_lines.last["outcome"]
  end

  def test_leading_colons_resolve
    execute("class" => "::NoopJob", "args" => [], "jid" => new_jid)
    assert_equal 200, last_response.status
  end

  # --- 409 ---------------------------------------------------------------

  def test_duplicate_jid_while_running
    jid = new_jid
    first = Thread.new do
      session = Rack::MockSession.new(app)
      Rack::Test::Session.new(session).tap do |s|
        s.header "Authorization", "Bearer #{TOKEN}"
        s.post "/jobs/execute", JSON.generate("class" => "BlockingJob", "args" => [], "jid" => jid)
      end.last_response
    end
    BlockingJob::STARTED.pop
    execute("class" => "BlockingJob", "args" => [], "jid" => jid)
    assert_equal 409, last_response.status
    assert_equal({"status" => "duplicate"}, json)
    BlockingJob::RELEASE << true
    assert_equal 200, first.value.status
    execute("class" => "NoopJob", "args" => [], "jid" => jid)
    assert_equal 200, last_response.status, "jid is free again once the first run ended"
  end

  # --- 503 ---------------------------------------------------------------

  def test_unavailable_while_booting_and_draining
    @state = GokiqSidecar::State.new(:booting)
    execute("class" => "HardJob", "args" => [], "jid" => (jid = new_jid))
    assert_equal 503, last_response.status
    assert_equal({"status" => "unavailable", "reason" => "booting"}, json)
    post_json("/jobs/exhausted", "job" => {"class" => "FailJob", "args" => []})
    assert_equal 503, last_response.status
    get "/ready"
    assert_equal 503, last_response.status
    get "/health"
    assert_equal 200, last_response.status
    state.ready!
    state.draining!
    execute("class" => "HardJob", "args" => [], "jid" => jid)
    assert_equal({"status" => "unavailable", "reason" => "draining"}, json)
    assert_empty runs(jid)
  end

  def test_ready_fails_when_database_check_fails
    @app = GokiqSidecar::App.new(auth: GokiqSidecar::Auth.new(TOKEN), state: state, logger: GokiqSidecar::JsonLogger.new(log_io),
                                 ready_check: -> { false })
    get "/ready"
    assert_equal 503, last_response.status
    assert_equal "database", json["reason"]
  end

  def test_not_found_and_wrong_method
    get "/nope"
    assert_equal 404, last_response.status
    get "/jobs/execute"
    assert_equal 405, last_response.status
  end

  # --- metrics --------------------------------------------------------------

  def test_metrics
    execute("class" => "NoopJob", "args" => [], "jid" => new_jid)
    execute("class" => "FailJob", "args" => [], "jid" => new_jid)
    execute("class" => "Kernel", "args" => [], "jid" => new_jid)
    get "/metrics"
    body = last_response.body
    assert_match %r{\Atext/plain}, last_response.headers["Content-Type"]
    assert_includes body, %(gokiq_sidecar_jobs_total{class="NoopJob",outcome="ok"} 1)
    assert_includes body, %(gokiq_sidecar_jobs_total{class="FailJob",outcome="failed"} 1)
    assert_includes body, %(outcome="invalid_class"} 1)
    assert_includes body, "gokiq_sidecar_jobs_in_progress 0"
    assert_includes body, %(gokiq_sidecar_job_duration_seconds_bucket{le="+Inf"} 2)
    assert_includes body, "gokiq_sidecar_job_duration_seconds_count 2"
    assert_includes body, "# TYPE gokiq_sidecar_job_duration_seconds histogram"
  end
end
