require "json"

module GokiqSidecar
  # The Rack application: routing, request validation and the JSON contract
  # documented in README.md. Job execution itself is Runner's business.
  class App
    JSON_HEADERS = {"Content-Type" => "application/json"}.freeze
    DEFAULT_MAX_BODY = 10 * 1024 * 1024

    class BadRequest < StandardError; end
    class TooLarge < StandardError; end

    attr_reader :state, :metrics

    def initialize(auth:, state: State.new, runner: nil, metrics: Metrics.new,
                   logger: JsonLogger.new, max_body_bytes: DEFAULT_MAX_BODY, ready_check: nil,
                   policy: JobPolicy.new)
      @auth = auth
      @state = state
      @logger = logger
      resolver = Resolver.new(policy: policy)
      @runner = runner || Runner.new(resolver: resolver, logger: logger, context: state)
      @catalog = JobCatalog.new(resolver: resolver, policy: policy)
      @metrics = metrics
      @max_body = max_body_bytes
      @ready_check = ready_check || method(:database_ok?)
    end

    def call(env)
      method = env["REQUEST_METHOD"]
      case env["PATH_INFO"]
      when "/health" then method == "GET" ? reply(200, status: "ok", sidekiq_version: ::Sidekiq::VERSION) : not_allowed
      when "/ready" then method == "GET" ? ready : not_allowed
      when "/metrics" then method == "GET" ? metrics_page : not_allowed
      when "/classes" then method == "GET" ? classes(env) : not_allowed
      when "/jobs/execute" then method == "POST" ? guarded(env) { |body| execute(env, body) } : not_allowed
      when "/jobs/exhausted" then method == "POST" ? guarded(env) { |body| exhausted(body) } : not_allowed
      else reply(404, status: "not_found")
      end
    rescue => e
      # A bug here, not in the job: "error", not "failed". gokiq still counts
      # it against the job (Gokiq::SidecarHTTP500), so a payload that trips it
      # ends in the dead set instead of going round forever.
      @logger.error("internal error", error_class: e.class.name, error_message: Runner.error_message(e))
      reply(500, status: "error", error_message: Runner.error_message(e))
    end

    private

    def reply(code, body, headers = JSON_HEADERS)
      [code, headers.dup, [body.is_a?(String) ? body : JSON.generate(body)]]
    end

    def not_allowed
      reply(405, status: "method_not_allowed")
    end

    # Order: who is asking, can we take work, is the body acceptable.
    def guarded(env)
      return reply(401, status: "unauthorized") unless @auth.allowed?(env)
      return reply(503, status: "unavailable", reason: @state.phase.to_s) unless @state.ready?
      yield read_json_object(env)
    rescue TooLarge
      reply(413, status: "too_large")
    rescue BadRequest => e
      reply(400, status: "bad_request", error_message: e.message)
    end

    # What gokiq-api validates submissions against: authenticated like /jobs/*, since it
    # lists the app's job classes.
    def classes(env)
      return reply(401, status: "unauthorized") unless @auth.allowed?(env)
      return reply(503, status: "unavailable", reason: @state.phase.to_s) unless @state.ready?
      reply(200, @catalog.to_h)
    end

    def read_json_object(env)
      declared = env["CONTENT_LENGTH"]
      raise TooLarge if declared && declared.to_i > @max_body
      input = env["rack.input"]
      raw = input ? input.read(@max_body + 1).to_s : ""
      raise TooLarge if raw.bytesize > @max_body
      parsed = begin
        JSON.parse(raw)
      rescue JSON::ParserError => e
        raise BadRequest, "body is not JSON: #{e.message[0, 200]}"
      end
      raise BadRequest, "body must be a JSON object" unless parsed.is_a?(Hash)
      parsed
    end

    def validate_job!(job)
      raise BadRequest, "job must be a JSON object" unless job.is_a?(Hash)
      raise BadRequest, "job has no \"class\" string" unless job["class"].is_a?(String) && !job["class"].empty?
      raise BadRequest, "job \"args\" must be an array" unless job["args"].is_a?(Array)
    end

    def execute(env, job)
      validate_job!(job)
      queue = env["HTTP_X_GOKIQ_QUEUE"].to_s
      queue = job["queue"].is_a?(String) ? job["queue"] : "default" if queue.empty?
      log = {jid: job["jid"], class: @runner.display_class(job), queue: queue}

      klass = begin
        @runner.resolve(job)
      rescue Resolver::InvalidClass => e
        @metrics.job_rejected("(invalid)", "invalid_class")
        @logger.info("job done", **log, duration: 0.0, outcome: "invalid_class", error_message: e.message)
        return reply(422, status: "invalid_class", error_class: "NameError", error_message: e.message)
      end

      label = Resolver.label(klass, job)
      unless @state.claim(job["jid"])
        @metrics.job_rejected(label, "duplicate")
        @logger.info("job done", **log, duration: 0.0, outcome: "duplicate")
        return reply(409, status: "duplicate")
      end

      begin
        @metrics.job_started
        result = @runner.execute(klass, job, queue)
      ensure
        @state.release(job["jid"])
        @metrics.job_finished(label, result&.outcome || "aborted", result&.duration || 0.0)
      end
      respond_to_result(result, log)
    end

    def respond_to_result(result, log)
      if result.outcome == "ok"
        @logger.info("job done", **log, duration: result.duration.round(6), outcome: "ok")
        return reply(200, status: "ok", execution_time: result.duration)
      end
      e = result.error
      message = Runner.error_message(e)
      @logger.info("job done", **log, duration: result.duration.round(6), outcome: "failed",
                                    error_class: e.class.name, error_message: message[0, 500])
      reply(500, status: "failed", execution_time: result.duration,
                 error_class: e.class.name, error_message: message,
                 backtrace: result.backtrace,
                 retry_in: result.retry_in, class_retry: result.class_retry)
    end

    def exhausted(body)
      job = body["job"]
      validate_job!(job)
      result = @runner.exhausted(job, body["error_class"], body["error_message"],
                                 run_hook: body["run_hook"] == true,
                                 death_handlers: body["death_handlers"] != false,
                                 discarded: body["discarded"] == true)
      @metrics.exhausted(exhausted_label(job))
      log_exhausted(job, result)
      reply(200, status: "ok", hook_ran: result.hook_ran, discard: result.discard)
    end

    def exhausted_label(job)
      Resolver.label(@runner.resolve(job), job)
    rescue Resolver::InvalidClass
      "(invalid)"
    end

    # gokiq calls /jobs/exhausted twice for a dead job: the hook, then the
    # death handlers (the only call for `retry: false`). One "job exhausted"
    # line per job, on the death-handler call; the hook call only logs a hook
    # that ran.
    def log_exhausted(job, result)
      log = {jid: job["jid"], class: @runner.display_class(job)}
      @logger.info("retries-exhausted hook ran", **log, discard: result.discard) if result.hook_ran
      @logger.info("job exhausted", **log, death_handlers: result.death_handlers) if result.death_handlers
    end

    def ready
      return reply(503, status: "unavailable", reason: @state.phase.to_s) unless @state.ready?
      return reply(200, status: "ok") if @ready_check.call
      reply(503, status: "unavailable", reason: "database")
    end

    def database_ok?
      return true unless defined?(::ActiveRecord::Base)
      ::ActiveRecord::Base.connection_pool.with_connection { |c| c.execute("select 1") }
      true
    rescue => e
      @logger.warn("readiness check failed", error_class: e.class.name, error_message: Runner.error_message(e))
      false
    end

    def metrics_page
      reply(200, @metrics.to_prometheus, {"Content-Type" => "text/plain; version=0.0.4"})
    end
  end
end
