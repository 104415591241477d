module GokiqSidecar
  # Runs one job the way Sidekiq 6.4's processor does (docs/sidekiq-protocol.md §5.1):
  # log context and per-job log level, then Sidekiq's configured reloader
  # (Rails executor: connection checkout/return, query cache, CurrentAttributes
  # reset), then a fresh instance with its jid, the server middleware chain
  # and perform. It reports what happened; retrying is gokiq's job, not ours.
  class Runner
    Result = Struct.new(:outcome, :duration, :error, :backtrace, :retry_in, :class_retry, keyword_init: true)
    ExhaustedResult = Struct.new(:hook_ran, :discard, :death_handlers, keyword_init: true)

    # error_message is cut to this many characters (gokiq's MAX_ERROR_MESSAGE).
    MAX_MESSAGE = 10_000

    # `context`: what a job's `_context` is set to (answers `stopping?`), as
    # Sidekiq 7.3+'s processor sets it to itself.
    def initialize(resolver: Resolver.new, logger: JsonLogger.new, sidekiq: SidekiqConfig.current, context: nil)
      @resolver = resolver
      @logger = logger
      @sidekiq = sidekiq
      @context = context
    end

    # Raises Resolver::InvalidClass before anything is instantiated.
    def resolve(job)
      @resolver.runnable_class(job)
    end

    # The name logs show: the first non-empty string of display_class and
    # wrapped, else class (gokiq's Job.display_class; tests/test_shared_values.py).
    def display_class(job)
      name = job.values_at("display_class", "wrapped").find { |v| v.is_a?(String) && !v.empty? }
      name || job["class"].to_s
    end

    def execute(klass, job, queue)
      started = now
      begin
        with_context(job) do
          @sidekiq.job_scope do
            @sidekiq.reloader.call do
              worker = klass.new
              worker.jid = job["jid"]
              worker._context = @context if @context && worker.respond_to?(:_context=)
              @sidekiq.server_middleware.invoke(worker, job, queue) do
                worker.perform(*job["args"])
              end
            end
          end
        end
        Result.new(outcome: "ok", duration: now - started)
      rescue ::Sidekiq::JobRetry::Skip
        # A server middleware has already dealt with the job, as Sidekiq's
        # processor acknowledges it without a retry: e.g. 7.3+'s InterruptHandler,
        # which pushed an interrupted iterable job back to its queue. A failure
        # here would run it twice (that copy and gokiq's retry).
        Result.new(outcome: "ok", duration: now - started)
      rescue Exception => e # rubocop:disable Lint/RescueException -- Sidekiq's retry layer catches Exception too
        # Drain timeout hit (Puma kills the thread): drop the connection so the
        # caller sees a transport error, not a job failure, and the job keeps
        # its retry budget. Compared by name: Puma is not loaded under rack-test.
        raise if e.class.name == "Puma::ThreadPool::ForceShutdown"
        Result.new(outcome: "failed", duration: now - started, error: e,
                   backtrace: @sidekiq.clean_backtrace(e.backtrace).map { |l| l.to_s.scrub },
                   retry_in: retry_in(klass, job, e), class_retry: class_retry(klass, job))
      end
    end

    # What Sidekiq does once retries are used up: the class's
    # sidekiq_retries_exhausted hook (when asked), then every death handler
    # (unless told not to: gokiq asks for them in a second call, after it
    # has added the job to the dead set, which is Sidekiq's order).
    # `discarded`: the hook call before this one answered discard; the
    # handlers then run only if this Sidekiq version runs them after one.
    # Hook and handler errors are logged, never raised.
    def exhausted(job, error_class, error_message, run_hook:, death_handlers: true, discarded: false)
      death_handlers &&= !discarded || @sidekiq.death_handlers_after_discard?
      exception = build_exception(error_class, error_message)
      klass = begin
        @resolver.runnable_class(job)
      rescue Resolver::InvalidClass
        nil
      end
      result = ExhaustedResult.new(hook_ran: false, discard: false)
      with_context(job) do
        @sidekiq.job_scope do
          @sidekiq.reloader.call do
            run_exhausted_hook(klass, job, exception, result) if klass && run_hook
            run_death_handlers(job, exception, result) if death_handlers
          end
        end
      end
      result
    end

    def self.error_message(exception)
      message = begin
        exception.message.to_s[0, MAX_MESSAGE]
      rescue
        +"!!! ERROR MESSAGE THREW AN ERROR !!!"
      end
      message = message.dup.force_encoding(Encoding::UTF_8)
      message.valid_encoding? ? message : message.scrub
    end

    private

    def now
      ::Process.clock_gettime(::Process::CLOCK_MONOTONIC)
    end

    # Same context keys as Sidekiq::JobLogger#prepare, so Rails.logger lines
    # written by the job carry jid/class just as under `sidekiq`.
    def with_context(job, &block)
      previous = Thread.current[:sidekiq_context]
      Thread.current[:sidekiq_context] = @sidekiq.job_log_context(job, display_class(job))
      @sidekiq.with_job_log_level(::Sidekiq.logger, job["log_level"], &block)
    ensure
      Thread.current[:sidekiq_context] = previous
    end

    # For ActiveJob wrapper payloads, the wrapped class's hooks win when it
    # declares one (what Sidekiq 7.1.3+ does); otherwise the class's own.
    def hook_owner(klass, job, attribute)
      if @resolver.wrapper?(klass)
        wrapped = @resolver.wrapped_class(job)
        return wrapped if wrapped.respond_to?(attribute) && wrapped.public_send(attribute)
      end
      klass.respond_to?(attribute) ? klass : nil
    end

    # Sidekiq calls the block with the retry_count this failure will record:
    # 0 on the first failure, the payload's retry_count + 1 afterwards; 7.1+
    # adds the job hash as a third argument.
    def retry_in(klass, job, exception)
      owner = hook_owner(klass, job, :sidekiq_retry_in_block)
      block = owner&.sidekiq_retry_in_block
      return nil unless block
      count = job["retry_count"].is_a?(Integer) ? job["retry_count"] + 1 : 0
      value = block.call(*@sidekiq.retry_in_arguments(count, exception, job))
      return value.to_s if value == :discard || value == :kill
      # Integer, Float or ActiveSupport::Duration (5.minutes); Sidekiq uses to_i.
      return nil unless value.is_a?(Numeric) || (defined?(::ActiveSupport::Duration) && value.is_a?(::ActiveSupport::Duration))
      seconds = value.to_i
      seconds > 0 ? seconds : nil
    rescue Exception => e # rubocop:disable Lint/RescueException
      log_hook_error("sidekiq_retry_in", job, e)
      nil
    end

    def class_retry(klass, job)
      owner = @resolver.wrapper?(klass) ? (@resolver.wrapped_class(job) || klass) : klass
      owner.respond_to?(:get_sidekiq_options) ? owner.get_sidekiq_options["retry"] : nil
    rescue
      nil
    end

    # The handlers expect an exception object. Rebuild the named class when it
    # is a loadable Exception whose constructor takes a message; otherwise a
    # RuntimeError carrying "ErrorClass: message".
    def build_exception(error_class, error_message)
      message = error_message.to_s
      klass = error_class.is_a?(String) ? @resolver.exception_class(error_class) : nil
      exception = begin
        klass&.new(message)
      rescue
        nil
      end
      exception = nil if exception && exception.message != message
      exception || RuntimeError.new([error_class, message].compact.join(": "))
    end

    def run_exhausted_hook(klass, job, exception, result)
      block = hook_owner(klass, job, :sidekiq_retries_exhausted_block)&.sidekiq_retries_exhausted_block
      return unless block
      result.hook_ran = true
      returned = block.call(job, exception)
      result.discard = returned == :discard && @sidekiq.exhausted_hook_can_discard?
    rescue => e
      log_hook_error("sidekiq_retries_exhausted", job, e)
    end

    # result.death_handlers: how many were called (nil: not asked to).
    def run_death_handlers(job, exception, result)
      result.death_handlers = 0
      @sidekiq.death_handlers.each do |handler|
        result.death_handlers += 1
        handler.call(job, exception)
      rescue => e
        log_hook_error("death handler", job, e)
      end
    end

    def log_hook_error(what, job, error)
      @logger.error("#{what} raised", jid: job["jid"], class: display_class(job),
                                       error_class: error.class.name, error_message: self.class.error_message(error))
    end
  end
end
