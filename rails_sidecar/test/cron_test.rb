require_relative "test_helper"

# The sidecar runs sidekiq-cron's own poller through the gem's launcher module (the e2e test
# tests/e2e/test_cron.py checks the enqueued ticks against a real Redis). The test app's
# Redis is unreachable on purpose: the gem's poller waits 10-15 s before its first poll, and
# every test here stops it before then.
class CronTest < Minitest::Test
  def setup
    skip "Debian's sidekiq-cron 1.8 runs on Sidekiq 6 only" unless defined?(::Sidekiq::Cron)
    @saved_interval = Sidekiq::Options[:cron_poll_interval]
    @log = StringIO.new
  end

  def teardown
    return unless defined?(::Sidekiq::Cron)
    GokiqSidecar::Cron.stop
    Sidekiq::Options[:cron_poll_interval] = @saved_interval
  end

  def logger
    GokiqSidecar::JsonLogger.new(@log)
  end

  def log_lines
    @log.string.lines.map { |l| JSON.parse(l) }
  end

  def test_the_app_uses_sidekiq_cron_in_server_mode
    assert GokiqSidecar::Cron.used_by_app?, "sidekiq-cron's launcher module is not on Sidekiq::Launcher"
  end

  def test_start_runs_the_gems_poller_once_and_stop_ends_it
    Sidekiq::Options[:cron_poll_interval] = 5
    GokiqSidecar::Cron.start(logger)
    launcher = GokiqSidecar::Cron.instance_variable_get(:@launcher)
    GokiqSidecar::Cron.start(logger) # a second call (e.g. a second boot hook) adds no poller
    assert_same launcher, GokiqSidecar::Cron.instance_variable_get(:@launcher)
    poller = launcher.cron_poller
    assert_kind_of Sidekiq::Cron::Poller, poller
    thread = poller.instance_variable_get(:@thread)
    assert thread&.alive?, "the gem's poller thread is not running"
    assert_equal [["sidekiq-cron poller started", 5]], log_lines.map { |l| [l["msg"], l["poll_interval"]] }

    GokiqSidecar::Cron.stop
    refute GokiqSidecar::Cron.running?
    refute thread.alive?, "the poller thread survived stop"
  end

  def test_the_gems_option_zero_turns_polling_off
    Sidekiq::Options[:cron_poll_interval] = 0
    GokiqSidecar::Cron.start(logger)
    assert_nil GokiqSidecar::Cron.instance_variable_get(:@launcher).cron_poller
    assert_equal ["sidekiq-cron polling off (cron_poll_interval 0)"], log_lines.map { |l| l["msg"] }
  end
end
