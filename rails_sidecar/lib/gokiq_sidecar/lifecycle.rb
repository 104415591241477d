module GokiqSidecar
  # Fires the app's Sidekiq lifecycle events (`config.on(:startup)` ...) the
  # way Sidekiq's CLI and launcher do, once per process that booted the app:
  #   startup  - after boot, before the first job is accepted;
  #   heartbeat - on the first beat; beat (6.5+) on every beat, every
  #              Sidekiq::Launcher::BEAT_PAUSE seconds (5 on 6.4, 10 on 7+);
  #   quiet, shutdown - when draining starts (in that order, newest block first,
  #              while running jobs finish, as Launcher#stop does);
  #   exit (8.x) - after the drain, just before the process ends.
  # A block that raises goes to the app's error handlers (Sidekiq's default
  # one logs it) and to our JSON log; it never stops the process.
  class Lifecycle
    # `on_beat`: called on every beat too, after the events (the CLI re-publishes the app's
    # Sidekiq version there, so a flushed key or a Redis that was down at boot heals).
    def initialize(logger:, sidekiq: SidekiqConfig.current, beat_interval: nil, on_beat: nil)
      @logger = logger
      @sidekiq = sidekiq
      @beat_interval = beat_interval
      @on_beat = on_beat
      @lock = Mutex.new
      @wake = ConditionVariable.new
      @phase = :new
    end

    attr_reader :phase

    # Returns false (and fires nothing) once stopping has begun.
    def startup
      return false unless advance(from: :new, to: :started)
      fire(:startup)
      @beats = Thread.new { beat_loop }
      true
    end

    # Safe to call from a signal trap or Puma's server thread: the hooks run
    # in a thread of their own, which #finish waits for. No-op unless started.
    def stopping
      advance(from: :new, to: :finished) # stopped while booting: never fire
      return unless advance(from: :started, to: :stopping)
      @stopper = Thread.new do
        fire(:quiet, reverse: true)
        fire(:shutdown, reverse: true)
      end
    end

    # After the drain: wait for the quiet/shutdown hooks, stop beating, exit event.
    def finish
      @stopper&.join
      return unless advance(from: :stopping, to: :finished)
      @lock.synchronize { @wake.broadcast }
      @beats&.join
      fire(:exit, reverse: true) if @sidekiq.lifecycle_event?(:exit)
    end

    private

    def advance(from:, to:)
      @lock.synchronize do
        return false unless @phase == from
        @phase = to
        true
      end
    end

    def beat_loop
      interval = @beat_interval || @sidekiq.beat_interval
      loop do
        fire(:heartbeat)
        fire(:beat, oneshot: false) if @sidekiq.lifecycle_event?(:beat)
        @on_beat&.call
        @lock.synchronize do
          @wake.wait(@lock, interval) unless @phase == :finished
          return if @phase == :finished
        end
      end
    rescue => e
      @logger.error("heartbeat stopped", error_class: e.class.name, error_message: Runner.error_message(e))
    end

    def fire(event, **options)
      @sidekiq.fire_event(event, **options) do |error|
        @logger.error("lifecycle event raised", event: event.to_s, error_class: error.class.name,
                                                error_message: Runner.error_message(error))
      end
    end
  end
end
