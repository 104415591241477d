require_relative "test_helper"

# Lifecycle against the real Sidekiq configuration of the booted example app:
# blocks are registered where `config.on(event)` puts them.
class LifecycleTest < Minitest::Test
  def setup
    @sidekiq = GokiqSidecar::SidekiqConfig.current
    @events = @sidekiq.lifecycle_events
    @saved = @events.transform_values(&:dup)
    @events.each_value(&:clear)
    @fired = Queue.new
    @log = StringIO.new
    @lifecycle = GokiqSidecar::Lifecycle.new(logger: GokiqSidecar::JsonLogger.new(@log), beat_interval: 0.05)
  end

  def teardown
    @lifecycle.stopping
    @lifecycle.finish
    @saved.each { |event, blocks| @events[event].replace(blocks) }
  end

  def on(event, name = event, &block)
    @events[event] << (block || -> { @fired << name })
  end

  def fired
    names = []
    names << @fired.pop until @fired.empty?
    names
  end

  def wait_for_fired(name)
    deadline = Time.now + 30
    seen = []
    until seen.include?(name)
      flunk "#{name} not fired; saw #{seen}" if Time.now > deadline
      seen << @fired.pop unless @fired.empty?
      sleep 0.01
    end
    seen
  end

  def test_sidekiq_events_fire_once_each_in_the_launchers_order
    %i[startup quiet shutdown heartbeat].each { |e| on(e) }
    on(:shutdown, :shutdown_registered_last)
    on(:quiet, :quiet_registered_last)
    assert @lifecycle.startup
    refute @lifecycle.startup, "a second startup fires nothing"
    wait_for_fired(:heartbeat)
    sleep 0.3 # about six more beats: :heartbeat is Sidekiq's one-shot first-beat event
    @lifecycle.stopping
    @lifecycle.stopping
    @lifecycle.finish
    @lifecycle.finish
    assert_equal %i[quiet_registered_last quiet shutdown_registered_last shutdown], fired,
                 "quiet then shutdown, newest block first (reverse: true), each once"
  end

  def test_startup_before_the_first_heartbeat
    on(:startup)
    on(:heartbeat)
    @lifecycle.startup
    assert_equal %i[startup heartbeat], wait_for_fired(:heartbeat)
  end

  def test_beat_fires_on_every_heartbeat_where_sidekiq_has_it
    skip "Sidekiq #{Sidekiq::VERSION} has no :beat event (6.5+)" unless @sidekiq.lifecycle_event?(:beat)
    on(:heartbeat)
    on(:beat)
    @lifecycle.startup
    3.times { wait_for_fired(:beat) }
    @lifecycle.stopping
    @lifecycle.finish
    @fired.clear
    sleep 0.2
    assert_empty fired, "no beat after finish"
  end

  def test_beat_interval_is_sidekiqs
    assert_equal Sidekiq::VERSION.start_with?("6.4") ? 5 : 10, @sidekiq.beat_interval
  end

  def test_a_raising_hook_is_logged_and_the_next_one_still_runs
    errors = []
    handler = ->(ex, ctx, _config = nil) { errors << [ex.message, ctx[:event]] }
    (error_handlers = @sidekiq.error_handlers) << handler
    on(:startup) { raise "hook broke" }
    on(:startup)
    assert @lifecycle.startup
    assert_includes fired, :startup
    assert_equal [["hook broke", :startup]], errors, "the app's error handlers hear of it, as under Sidekiq"
    line = @log.string.lines.map { |l| JSON.parse(l) }.find { |l| l["msg"] == "lifecycle event raised" }
    assert_equal({"event" => "startup", "error_class" => "RuntimeError", "error_message" => "hook broke"},
                 line.slice("event", "error_class", "error_message"))
  ensure
    error_handlers&.delete(handler)
  end

  def test_on_beat_runs_on_every_beat
    beats = Queue.new
    lifecycle = GokiqSidecar::Lifecycle.new(logger: GokiqSidecar::JsonLogger.new(@log), beat_interval: 0.05,
                                            on_beat: -> { beats << :beat })
    lifecycle.startup
    deadline = Time.now + 30
    sleep 0.01 until beats.size >= 3 || Time.now > deadline
    assert_operator beats.size, :>=, 3
  ensure
    lifecycle&.stopping
    lifecycle&.finish
  end

  def test_stopping_before_startup_fires_nothing
    %i[startup quiet shutdown].each { |e| on(e) }
    @lifecycle.stopping
    @lifecycle.finish
    refute @lifecycle.startup, "no startup once the process is stopping"
    assert_empty fired
  end
end
