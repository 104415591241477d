module GokiqSidecar
  # sidekiq-cron's poller, run in the sidecar the way Sidekiq's launcher runs it.
  #
  # sidekiq-cron hooks itself into Sidekiq by prepending Sidekiq::Cron::Launcher
  # onto Sidekiq::Launcher (from a Sidekiq.configure_server block, so only in
  # server mode): its #initialize builds a Sidekiq::Cron::Poller from the
  # launcher's config, #run starts it, #quiet / #stop terminate it. The sidecar
  # never builds a Sidekiq::Launcher (that would also start fetching jobs), so
  # it prepends the gem's module onto a launcher that does nothing else and
  # calls the same three methods. The gem's own code then decides everything:
  # its poll interval option (`cron_poll_interval`, 0 = off), its Redis keys,
  # and its de-duplication (a ZADD on `cron_job:<name>:enqueued`: the first
  # process to add a tick enqueues it), so sidecars, bridges and any Ruby
  # Sidekiq still running sidekiq-cron never enqueue a tick twice.
  module Cron
    # What the gem's module is prepended to: accepts every version's
    # Launcher.new signature and does nothing itself.
    class LauncherShell
      def initialize(*_args, **_kwargs)
      end

      def run
      end

      def quiet
      end

      def stop
      end
    end

    @lock = Mutex.new
    @launcher = nil

    class << self
      # Whether Sidekiq's launcher would run a cron poller in this process:
      # the app loaded sidekiq-cron, and its configure_server block ran.
      def used_by_app?
        defined?(::Sidekiq::Cron::Launcher) && defined?(::Sidekiq::Launcher) &&
          ::Sidekiq::Launcher.ancestors.include?(::Sidekiq::Cron::Launcher)
      end

      # Once the app is booted. At most one poller per process: Puma's cluster
      # mode boots the app in every worker, so the CLI calls this in worker 0
      # only (one poller per sidecar, like one per Sidekiq process).
      def start(logger)
        return unless used_by_app?
        @lock.synchronize do
          return if @launcher
          launcher = Class.new(LauncherShell) { prepend ::Sidekiq::Cron::Launcher }.new(launcher_config)
          launcher.run
          @launcher = launcher
        end
        interval = launcher_config[:cron_poll_interval]
        if @launcher.cron_poller
          logger.info("sidekiq-cron poller started", pid: Process.pid, poll_interval: interval)
        else
          logger.info("sidekiq-cron polling off (cron_poll_interval 0)", pid: Process.pid)
        end
      end

      # On shutdown, once Puma has stopped serving. The gem's #stop terminates
      # the poller and waits for a tick it is enqueueing, so a clean stop never
      # leaves a tick claimed in Redis but not pushed. Not called from Puma's
      # signal trap: the poller's mutex cannot be taken there.
      def stop
        launcher = @lock.synchronize { @launcher.tap { @launcher = nil } }
        launcher&.stop
      end

      def running?
        !@launcher.nil?
      end

      def launcher_config
        SidekiqConfig.current.launcher_config
      end
    end
  end
end
