module GokiqSidecar
  # The one place that knows how Sidekiq's configuration API differs between
  # versions. 6.x keeps its settings on the Sidekiq module (`Sidekiq.options`,
  # `Sidekiq[:key]` from 6.5); 7.0+ keeps them on `Sidekiq.default_configuration`
  # and runs jobs inside a capsule. Everything else in the sidecar asks this
  # adapter, never Sidekiq's module-level API, and never checks a version.
  #
  # The 8.x paths are the 7.x ones: written from Sidekiq 8's source (config.rb,
  # component.rb, launcher.rb, job_retry.rb), not run here (8.x needs Ruby 3.2).
  module SidekiqConfig
    # Decided once, after `require "sidekiq"`.
    def self.current
      @current ||= ::Sidekiq.respond_to?(:default_configuration) ? Modern.new(::Sidekiq.default_configuration) : Legacy.new
    end

    # What both APIs share once the settings are found.
    class Base
      def version
        ::Sidekiq::VERSION
      end

      # Sidekiq's default logger, writing to `io` instead of stdout: at INFO,
      # a Sidekiq server's level without --verbose (a bare Sidekiq::Logger.new
      # starts at DEBUG), with the formatter of the logger it replaces (Pretty,
      # or WithoutTimestamp on Heroku; 6.x sets it in Logger#initialize, but 7+
      # in Config#logger, so a bare one lost pid, tid, jid and class).
      def log_to(io)
        formatter = logger.formatter
        self.logger = ::Sidekiq::Logger.new(io, level: ::Logger::INFO).tap { |log| log.formatter = formatter }
      end

      # Seconds between two heartbeats of Sidekiq's launcher (5 on 6.4, 10 on 6.5+).
      def beat_interval
        require "sidekiq/launcher"
        ::Sidekiq::Launcher::BEAT_PAUSE
      end

      def lifecycle_event?(event)
        lifecycle_events.key?(event)
      end

      # Sidekiq's Component#fire_event: every block registered with
      # `config.on(event)`, errors given to the app's error handlers and to the
      # caller's block, never raised; one-shot events are emptied once fired.
      def fire_event(event, reverse: false, oneshot: true)
        blocks = lifecycle_events.fetch(event, [])
        blocks.reverse! if reverse
        blocks.each do |block|
          block.call
        rescue => e
          handle_exception(e, {context: "Exception during Sidekiq lifecycle event.", event: event})
          yield e if block_given?
        end
        blocks.clear if oneshot
      end

      # What a `sidekiq_retries_exhausted` hook's `:discard` does (JobRetry#retries_exhausted):
      # before 7.2.0 nothing (the return value is ignored: dead set, death handlers); from 7.2.0
      # the job skips the dead set.
      def exhausted_hook_can_discard?
        at_least?("7.2.0")
      end

      # 7.2.0 to 8.0.6 return at once after a hook's :discard; 8.0.7+ still run the handlers.
      def death_handlers_after_discard?
        at_least?("8.0.7")
      end

      # The log context Sidekiq's JobLogger#prepare gives a job's lines: jid
      # first from 8.0 (class first before), then the logged job attributes.
      # The class is the display name up to 8.0.6; 8.0.7 dropped display_class
      # from it (wrapped, else class).
      def job_log_context(job, class_name)
        class_name = job["wrapped"] || job["class"] if at_least?("8.0.7")
        jid = job["jid"]
        context = at_least?("8.0") ? {jid: jid, class: class_name} : {class: class_name, jid: jid}
        logged_job_attributes.each { |name| context[name.to_sym] = job[name] if job.key?(name) }
        context
      end

      # Runs the block at the job's `log_level`, as the JobLogger does:
      # Sidekiq::Logger#log_at up to 7.x; 8.x dropped it for Ruby's
      # Logger#with_level.
      def with_job_log_level(logger, level, &block)
        return logger.log_at(level, &block) if level && logger.respond_to?(:log_at)
        return logger.with_level(level, &block) if level && logger.respond_to?(:with_level)
        yield
      end

      # The arguments Sidekiq passes to a `sidekiq_retry_in` block.
      def retry_in_arguments(count, exception, job)
        three_argument_retry_in? ? [count, exception, job] : [count, exception]
      end

      # What Sidekiq stores as `error_backtrace` before cutting it to the
      # payload's `backtrace` option. A broken cleaner never hides the failure.
      def clean_backtrace(backtrace)
        lines = Array(backtrace)
        Array(backtrace_cleaner.call(lines))
      rescue
        lines
      end

      # Runs a job the way Sidekiq's processor thread sees the world.
      def job_scope
        yield
      end

      private

      def at_least?(version)
        Gem::Version.new(::Sidekiq::VERSION) >= Gem::Version.new(version)
      end
    end

    # Sidekiq 6.4 and 6.5: module-level settings.
    class Legacy < Base
      def logger
        ::Sidekiq.logger
      end

      # What Sidekiq's CLI hands its Launcher (and so sidekiq-cron's poller):
      # the options hash on 6.4, the Sidekiq module on 6.5 (it answers []).
      def launcher_config
        ::Sidekiq.respond_to?(:[]) ? ::Sidekiq : ::Sidekiq.options
      end

      def logger=(logger)
        ::Sidekiq.logger = logger
      end

      def reloader
        option(:reloader)
      end

      def server_middleware
        ::Sidekiq.server_middleware
      end

      def death_handlers
        ::Sidekiq.death_handlers
      end

      # Server mode sizes the Redis pool jobs use (`Sidekiq.redis`) as
      # concurrency + 5 when it is first created.
      def concurrency=(threads)
        set_option(:concurrency, threads)
      end

      def lifecycle_events
        option(:lifecycle_events)
      end

      def error_handlers
        ::Sidekiq.error_handlers
      end

      def handle_exception(error, context)
        error_handlers.each do |handler|
          handler.call(error, context)
        rescue => e
          ::Sidekiq.logger.error("!!! ERROR HANDLER THREW AN ERROR !!! #{e.class}: #{e.message}")
        end
      end

      private

      def three_argument_retry_in?
        false
      end

      def logged_job_attributes
        %w[bid tags]
      end

      # 6.x runs backtraces through no cleaner.
      def backtrace_cleaner
        ->(backtrace) { backtrace }
      end

      # 6.5 deprecates `Sidekiq.options` (with a warning per call) for `Sidekiq[key]`.
      def option(key)
        ::Sidekiq.respond_to?(:[]) ? ::Sidekiq[key] : ::Sidekiq.options[key]
      end

      def set_option(key, value)
        ::Sidekiq.respond_to?(:[]=) ? (::Sidekiq[key] = value) : (::Sidekiq.options[key] = value)
      end
    end

    # Sidekiq 7.x and 8.x: Sidekiq::Config, with the default capsule running jobs.
    class Modern < Base
      def initialize(config)
        @config = config
      end

      def logger
        @config.logger
      end

      # What Sidekiq's CLI hands its Launcher: the default Sidekiq::Config.
      def launcher_config
        @config
      end

      def logger=(logger)
        @config.logger = logger
      end

      def reloader
        @config[:reloader]
      end

      # The processor invokes its capsule's copy of the chain (made on first
      # use, after the app's configure_server blocks have run).
      def server_middleware
        @config.default_capsule.server_middleware
      end

      def death_handlers
        @config.death_handlers
      end

      # The default capsule's concurrency is the size of the Redis pool its
      # processor threads get from `Sidekiq.redis` (created on first use).
      def concurrency=(threads)
        @config.concurrency = threads
      end

      def lifecycle_events
        @config[:lifecycle_events]
      end

      def error_handlers
        @config.error_handlers
      end

      def handle_exception(error, context)
        @config.handle_exception(error, context)
      end

      # Sidekiq's processor threads carry their capsule, so `Sidekiq.redis`
      # inside a job uses the capsule's pool (sized to its concurrency), not
      # the internal pool of 10.
      def job_scope
        previous = Thread.current[:sidekiq_capsule]
        Thread.current[:sidekiq_capsule] = @config.default_capsule
        yield
      ensure
        Thread.current[:sidekiq_capsule] = previous
      end

      private

      # 8.0.9 made them a setting (default bid and tags, the fixed pair before).
      def logged_job_attributes
        @config[:logged_job_attributes] || %w[bid tags]
      end

      # 7.1.0 added the job hash as a third argument.
      def three_argument_retry_in?
        at_least?("7.1")
      end

      # 7.1+: the Rails engine sets it to Rails.backtrace_cleaner in server mode.
      def backtrace_cleaner
        @config[:backtrace_cleaner] || ->(backtrace) { backtrace }
      end
    end
  end
end
