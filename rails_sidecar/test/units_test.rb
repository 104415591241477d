require_relative "test_helper"

class UnitsTest < Minitest::Test
  def test_auth
    auth = GokiqSidecar::Auth.new("s3cret")
    assert auth.allowed?("HTTP_AUTHORIZATION" => "Bearer s3cret")
    refute auth.allowed?("HTTP_AUTHORIZATION" => "Bearer s3cre")
    refute auth.allowed?("HTTP_AUTHORIZATION" => "bearer s3cret")
    refute auth.allowed?("HTTP_AUTHORIZATION" => "s3cret")
    refute auth.allowed?({})
    assert GokiqSidecar::Auth.insecure.allowed?({})
  end

  # PumaGuard checks the token once per request and says so in env; App then trusts env.
  def test_auth_check_is_remembered_for_the_request_only_when_allowed
    auth = GokiqSidecar::Auth.new("s3cret")
    good = {"HTTP_AUTHORIZATION" => "Bearer s3cret"}
    bad = {"HTTP_AUTHORIZATION" => "Bearer wrong"}
    assert auth.check(good)
    assert good[GokiqSidecar::Auth::CHECKED]
    refute auth.check(bad)
    refute bad.key?(GokiqSidecar::Auth::CHECKED)
    refute auth.allowed?(bad)
    # What Rack makes of a client's header of that name: not the mark.
    refute auth.allowed?("HTTP_GOKIQ.TOKEN_CHECKED" => "true")
  end

  def test_resolver_never_evaluates
    r = GokiqSidecar::Resolver.new
    assert_equal HardJob, r.job_class("HardJob")
    assert_equal ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper, r.job_class("Sidekiq::ActiveJob::Wrapper")
    ["`touch /tmp/x`", "HardJob; exit", "eval(1)", "Kernel", "File", "IO", "Object", "BasicObject",
     "ActiveRecord::Base", "Rails", "A::", "::", "HardJob::"].each do |name|
      assert_raises(GokiqSidecar::Resolver::InvalidClass, name) { r.job_class(name) }
    end
    # Sidekiq 7.3.9+ defines Sidekiq::ActiveJob::Wrapper itself; the sidecar never adds the
    # module (it would shadow ::ActiveJob inside `module Sidekiq` code of older versions).
    assert r.wrapper?(ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper)
    if defined?(Sidekiq::ActiveJob)
      assert r.wrapper?(Sidekiq::ActiveJob::Wrapper), "Sidekiq 8.1's JobWrapper is this very class"
      file, = Object.const_source_location("Sidekiq::ActiveJob")
      assert_match %r{/sidekiq/rails\.rb\z}, file, "defined by Sidekiq itself"
      refute file.start_with?(SIDECAR_ROOT)
    end
  end

  def test_metrics_escape_labels
    m = GokiqSidecar::Metrics.new
    m.job_started
    m.job_finished("A\"B\\C", "ok", 0.2)
    text = m.to_prometheus
    assert_includes text, %(gokiq_sidecar_jobs_total{class="A\\"B\\\\C",outcome="ok"} 1)
    assert_includes text, %(gokiq_sidecar_job_duration_seconds_bucket{le="0.1"} 0)
    assert_includes text, %(gokiq_sidecar_job_duration_seconds_bucket{le="0.25"} 1)
  end

  # Sidekiq's server logs at INFO unless started with --verbose, in its own format (pid, tid,
  # the job's context); so does the sidecar, to stderr.
  def test_sidekiqs_logger_is_sidekiqs_default_one_on_stderr
    previous = Sidekiq.logger
    GokiqSidecar::Boot.frameworks
    assert_equal Logger::INFO, Sidekiq.logger.level
    assert_kind_of Sidekiq::Logger::Formatters::Pretty, Sidekiq.logger.formatter
    refute_same previous, Sidekiq.logger
  ensure
    GokiqSidecar::SidekiqConfig.current.logger = previous
  end

  # Sidekiq 8 dropped Sidekiq::Logger#log_at for Ruby's Logger#with_level.
  def test_a_jobs_log_level_through_log_at_or_with_level
    config = GokiqSidecar::SidekiqConfig.current
    seen = []
    seven = Object.new
    seven.define_singleton_method(:log_at) { |level, &run| seen << [:log_at, level] && run.call }
    eight = Object.new
    eight.define_singleton_method(:with_level) { |level, &run| seen << [:with_level, level] && run.call }
    assert_equal :ran, config.with_job_log_level(seven, "debug") { :ran }
    assert_equal :ran, config.with_job_log_level(eight, "warn") { :ran }
    assert_equal :ran, config.with_job_log_level(eight, nil) { :ran }
    assert_equal [[:log_at, "debug"], [:with_level, "warn"]], seen
  end

  # 8.0.9+: config[:logged_job_attributes] names the job fields a job's log lines carry.
  def test_logged_job_attributes_from_the_configuration
    job = {"jid" => "j1", "bid" => "b1", "tenant" => "acme"}
    modern = GokiqSidecar::SidekiqConfig::Modern.new({logged_job_attributes: ["tenant"]})
    assert_equal({class: "X", jid: "j1", tenant: "acme"}, modern.job_log_context(job, "X"))
    assert_equal({class: "X", jid: "j1", bid: "b1"}, GokiqSidecar::SidekiqConfig::Modern.new({}).job_log_context(job, "X"))
  end

  # 8.0.7 dropped display_class from a job's log context: wrapped, else class.
  def test_log_context_class_without_display_class_from_8_0_7
    job = {"jid" => "j1", "class" => "Wrapper", "wrapped" => "Real", "display_class" => "Shown"}
    contexts = %w[8.0.6 8.0.7].map do |release|
      modern = GokiqSidecar::SidekiqConfig::Modern.new({})
      modern.define_singleton_method(:at_least?) { |v| Gem::Version.new(release) >= Gem::Version.new(v) }
      modern.job_log_context(job, "Shown")
    end
    assert_equal [{jid: "j1", class: "Shown"}, {jid: "j1", class: "Real"}], contexts
  end

  def test_json_logger_one_line_per_event
    io = StringIO.new
    log = GokiqSidecar::JsonLogger.new(io, level: "info")
    log.debug("hidden")
    log.info("job done", jid: "j", outcome: "ok")
    lines = io.string.lines
    assert_equal 1, lines.size
    assert_equal "job done", JSON.parse(lines[0])["msg"]
  end

  # The timestamp, formatted once a second, reads as Time#iso8601(6) would, every second.
  def test_json_logger_timestamp_is_iso8601_utc_with_microseconds
    log = GokiqSidecar::JsonLogger.new(StringIO.new)
    3.times do
      before = Time.now.utc
      stamp = log.timestamp
      after = Time.now.utc
      assert_match(/\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\z/, stamp)
      assert_operator Time.iso8601(stamp), :>=, before.floor(6)
      assert_operator Time.iso8601(stamp), :<=, after
      sleep 0.6 # the next one is likely in another second
    end
  end

  def test_cli_parse
    o = GokiqSidecar::CLI.parse(%w[--port 9000 --threads 2:8 --workers 2 --max-body-bytes 100 --drain-timeout 3 --rails-root /tmp])
    assert_equal [9000, 2, 8, 2, 100, 3.0, "/tmp", "127.0.0.1"],
                 [o.port, o.min_threads, o.max_threads, o.workers, o.max_body_bytes, o.drain_timeout, o.rails_root, o.bind]
    assert_raises(OptionParser::InvalidArgument) { GokiqSidecar::CLI.parse(%w[--tls-cert a]) }
  end
end
