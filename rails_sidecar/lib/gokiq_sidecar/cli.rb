require "optparse"

module GokiqSidecar
  # Command line: parse options, boot the app, serve it with Puma.
  class CLI
    Options = Struct.new(:port, :bind, :min_threads, :max_threads, :workers, :tls_cert, :tls_key,
                         :insecure, :max_body_bytes, :drain_timeout, :rails_root, :allow_file,
                         keyword_init: true)

    def self.parse(argv)
      o = Options.new(port: 7433, bind: "127.0.0.1", min_threads: 5, max_threads: 20, workers: 0,
                      insecure: false, max_body_bytes: 10 * 1024 * 1024, drain_timeout: 25,
                      rails_root: ENV["RAILS_ROOT"] || Dir.pwd)
      parser = OptionParser.new do |p|
        p.banner = <<~TXT
          Usage: gokiq-sidecar [options]

          Runs the Rails app's Sidekiq jobs for gokiq's Celery workers over HTTP.
          Start it in the Rails app root (or set RAILS_ROOT / --rails-root).
          Callers must send `Authorization: Bearer $GOKIQ_SIDECAR_TOKEN`.

        TXT
        p.on("--port PORT", Integer, "TCP port to listen on (default 7433)") { |v| o.port = v }
        p.on("--bind HOST", "Address to listen on (default 127.0.0.1; use 0.0.0.0 only with TLS or a private network)") { |v| o.bind = v }
        p.on("--threads MIN:MAX", "Puma threads per process = jobs run at once (default 5:20)") do |v|
          min, max = v.split(":", 2).map { |x| Integer(x) }
          o.min_threads = min
          o.max_threads = max || min
        end
        p.on("--workers N", Integer, "Puma worker processes; 0 = single process (default 0)") { |v| o.workers = v }
        p.on("--tls-cert FILE", "PEM certificate; serve HTTPS (needs --tls-key)") { |v| o.tls_cert = v }
        p.on("--tls-key FILE", "PEM private key for --tls-cert") { |v| o.tls_key = v }
        p.on("--insecure-no-auth", "Accept requests without a token (development only)") { o.insecure = true }
        p.on("--max-body-bytes N", Integer, "Largest request body accepted, else 413 (default 10485760)") { |v| o.max_body_bytes = v }
        p.on("--drain-timeout SECONDS", Float, "On SIGTERM, wait this long for running jobs (default 25)") { |v| o.drain_timeout = v }
        p.on("--allow-file FILE", "Allow-list of job classes / Namespace::* (one a line), as GOKIQ_SIDECAR_ALLOW") { |v| o.allow_file = v }
        p.on("--rails-root DIR", "Rails app root (default $RAILS_ROOT, else the current directory)") { |v| o.rails_root = v }
        p.on("-h", "--help", "Show this help") do
          puts p
          puts <<~TXT

            Environment:
              GOKIQ_SIDECAR_TOKEN  bearer token callers must present (required unless --insecure-no-auth)
              RAILS_ROOT           Rails app root, as --rails-root
              GOKIQ_LOG_LEVEL      debug|info|warn|error for the JSON log on stdout (default info)
              GOKIQ_SIDECAR_ALLOW  job classes / Namespace::* allowed (comma-separated; see README)
            Routes: POST /jobs/execute, POST /jobs/exhausted, GET /health, /ready, /metrics
          TXT
          exit 0
        end
      end
      parser.parse!(argv)
      raise OptionParser::InvalidArgument, "--threads MIN:MAX needs 1 <= MIN <= MAX" unless o.min_threads >= 0 && o.max_threads >= 1 && o.min_threads <= o.max_threads
      raise OptionParser::InvalidArgument, "--tls-cert and --tls-key go together" if o.tls_cert.nil? ^ o.tls_key.nil?
      o.rails_root = File.expand_path(o.rails_root)
      o
    end

    def initialize(options, token: ENV["GOKIQ_SIDECAR_TOKEN"])
      @o = options
      @token = token
    end

    def run
      unless File.exist?(File.join(@o.rails_root, "config", "environment.rb"))
        abort "gokiq-sidecar: #{@o.rails_root} is not a Rails app root (no config/environment.rb); use --rails-root or RAILS_ROOT"
      end
      if !@o.insecure && @token.to_s.empty?
        abort "gokiq-sidecar: GOKIQ_SIDECAR_TOKEN is not set. Set it to the token the Celery workers send, " \
              "or pass --insecure-no-auth for local development."
      end
      placeholders = {"GOKIQ_SIDECAR_TOKEN" => @token, "SECRET_KEY_BASE" => ENV["SECRET_KEY_BASE"]}
                     .select { |_, value| value.to_s.include?("change-me") }.keys
      unless placeholders.empty?
        abort "gokiq-sidecar: #{placeholders.join(", ")} still hold the change-me placeholder of " \
              "docker/.env.example; set real secrets"
      end
      policy = allow_list
      # Rails apps assume the working directory is their root.
      Dir.chdir(@o.rails_root)
      Boot.bundler(@o.rails_root)
      require "puma"
      require "puma/configuration"
      require "puma/launcher"
      require "gokiq_sidecar"
      require "gokiq_sidecar/boot"
      require "gokiq_sidecar/puma_guard"
      Boot.frameworks
      # Jobs that push jobs share Sidekiq's Redis pool, which server mode sizes
      # from its concurrency; make it match the number of request threads.
      SidekiqConfig.current.concurrency = @o.max_threads

      @logger = JsonLogger.new
      @lifecycle = Lifecycle.new(logger: @logger, on_beat: method(:publish_sidekiq_version))
      auth = @o.insecure ? Auth.insecure : Auth.new(@token)
      @app = App.new(auth: auth, logger: @logger, max_body_bytes: @o.max_body_bytes, policy: policy)
      # Token and size checked before Puma buffers a body (see PumaGuard).
      PumaGuard.install(auth: auth, max_body: @o.max_body_bytes)
      @logger.warn("authentication disabled (--insecure-no-auth)") if @o.insecure
      launch
    end

    private

    # Read before the chdir: a relative --allow-file is relative to where we were started.
    def allow_list
      require "gokiq_sidecar/job_policy"
      JobPolicy.from(ENV["GOKIQ_SIDECAR_ALLOW"], @o.allow_file)
    rescue ArgumentError, SystemCallError => e
      abort "gokiq-sidecar: #{e.message}"
    end

    def launch
      cli = self
      o = @o
      app = @app
      config = Puma::Configuration.new(config_files: ["-"]) do |c|
        c.app app
        if o.tls_cert
          c.ssl_bind o.bind, o.port.to_s, cert: o.tls_cert, key: o.tls_key
        else
          c.bind "tcp://#{o.bind.include?(":") ? "[#{o.bind}]" : o.bind}:#{o.port}"
        end
        c.threads o.min_threads, o.max_threads
        c.workers o.workers
        c.preload_app! false
        c.environment ENV["RAILS_ENV"] || ENV["RACK_ENV"] || "development"
        c.force_shutdown_after o.drain_timeout
        c.raise_exception_on_sigterm false
        c.quiet
        c.lowlevel_error_handler do |e|
          [500, {"Content-Type" => "application/json"}, [JSON.generate(status: "error", error_message: e.message.to_s[0, 500])]]
        end
        # Cluster mode: every worker boots its own copy of the app after fork
        # (sqlite/Redis connections are not fork-safe to share), and so fires
        # the app's lifecycle events once per worker, like a Sidekiq swarm child.
        c.on_worker_boot { |index| cli.boot_in_background(index) }
        c.on_worker_shutdown do
          Cron.stop
          cli.finish_lifecycle
        end
      end
      # Puma's own messages go to stderr; stdout carries only the JSON job log.
      launcher = Puma::Launcher.new(config, events: Puma::Events.new($stderr, $stderr))
      state = @app.state
      # Let jobs arriving on kept-alive connections get a clear 503 while
      # Puma drains, instead of starting work we may not finish.
      %i[graceful_stop stop].each do |name|
        launcher.define_singleton_method(name) do
          state.draining!
          super()
        end
      end
      # Draining starts (any mode, not in a signal trap): :quiet, :shutdown.
      lifecycle = @lifecycle
      launcher.events.register(:state) { |status| lifecycle.stopping if status == :stop }
      # Booted only once Puma is up, so a fast boot failure can stop it.
      launcher.events.on_booted { cli.boot_in_background } if o.workers.zero?
      @launcher = launcher
      # Cluster mode: a worker that cannot boot the app says so here (see #stop_after_boot_failure).
      @worker_boot_failed, @worker_boot_failure = IO.pipe unless o.workers.zero?
      begin
        launcher.run
      ensure
        # Cluster mode: Puma's master ends its TERM handler with `exit 0`.
        exit 1 if worker_boot_failed?
      end
      Cron.stop
      finish_lifecycle
      exit 1 if state.boot_error
      @logger.info("stopped", running: state.running_count)
    end

    public

    # Puma listens first so /health answers and /jobs/* say 503 "booting"
    # instead of refusing connections while Rails loads. `worker_index` is
    # the Puma worker's (cluster mode): the app's cron poller runs in worker 0.
    def boot_in_background(worker_index = 0)
      state = @app.state
      logger = @logger
      root = @o.rails_root
      Thread.new do
        started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        Boot.application(root)
        start_serving
        logger.info("booted", rails_root: root, pid: Process.pid,
                              seconds: (Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).round(3))
        Cron.start(logger) if worker_index.zero? && state.ready?
      rescue Exception => e # rubocop:disable Lint/RescueException
        logger.error("boot failed", error_class: e.class.name, error_message: e.message.to_s[0, 2000],
                                    backtrace: Array(e.backtrace).first(20))
        state.boot_failed!(e)
        stop_after_boot_failure
      end
    end

    def finish_lifecycle
      @lifecycle.finish
    end

    # The contract with gokiq's Python side (`sidekiq_version = auto`): the
    # app's Sidekiq version, in the app's Redis, through the app's Sidekiq.redis.
    def publish_sidekiq_version
      ::Sidekiq.redis { |conn| conn.set(SIDEKIQ_VERSION_KEY, ::Sidekiq::VERSION) }
    rescue => e
      @logger.warn("cannot publish the Sidekiq version", key: SIDEKIQ_VERSION_KEY,
                                                          error_class: e.class.name, error_message: Runner.error_message(e))
    end

    private

    # The app is loaded: size the jobs' Redis pool again (an initializer may
    # have set another concurrency), fire :startup, then take jobs.
    def start_serving
      state = @app.state
      return if state.phase == :draining
      SidekiqConfig.current.concurrency = @o.max_threads
      return unless @lifecycle.startup
      publish_sidekiq_version
      state.ready! unless state.phase == :draining
    end

    # A sidecar that cannot load the app must not sit there answering 503
    # forever: stop Puma, then exit 1 (see #launch). In single mode Puma is
    # already up (the boot waits for it). A cluster worker tells the master,
    # which stops every worker and exits 1 (instead of forking new workers
    # that fail the same way), and ends at once.
    def stop_after_boot_failure
      return @launcher.stop if @o.workers.zero?
      @worker_boot_failure.write("x")
      Process.kill("TERM", Process.ppid)
      exit!(1)
    end

    def worker_boot_failed?
      return false unless @worker_boot_failed
      @worker_boot_failed.read_nonblock(1, exception: false).is_a?(String)
    end
  end
end
