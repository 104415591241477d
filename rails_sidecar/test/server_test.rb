require_relative "test_helper"
require "net/http"
require "socket"
require "open3"

# Boots the real bin/gokiq-sidecar (Puma) as a subprocess and talks HTTP to it.
class ServerTest < Minitest::Test
  BIN = File.join(SIDECAR_ROOT, "bin", "gokiq-sidecar")
  TOKEN = "server-test-token"

  def free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  def spawn_sidecar(port, dir, root: EXAMPLE_APP, env: {}, args: [])
    env = {"GOKIQ_SIDECAR_TOKEN" => TOKEN, "GOKIQ_EXAMPLE_DB" => File.join(dir, "server.sqlite3"),
           "REDIS_URL" => "redis://127.0.0.1:1/0", "RAILS_ROOT" => nil, **env}
    Process.spawn(env, RbConfig.ruby, BIN, "--port", port.to_s, "--threads", "2:4", "--drain-timeout", "10",
                  "--rails-root", root, *args, out: File.join(dir, "out.log"), err: File.join(dir, "err.log"))
  end

  def wait_ready(port, pid)
    deadline = Time.now + 60
    loop do
      flunk "sidecar exited early" if Process.wait(pid, Process::WNOHANG)
      begin
        return Time.now if Net::HTTP.get_response("127.0.0.1", "/ready", port).code == "200"
      rescue SystemCallError, IOError, Net::ReadTimeout
        # not listening yet
      end
      flunk "sidecar not ready after 60 s" if Time.now > deadline
      sleep 0.1
    end
  end

  def kill_if_running(pid)
    return unless pid
    Process.kill("KILL", pid)
    Process.wait(pid)
  end

  def post(http, path, body, token: TOKEN)
    req = Net::HTTP::Post.new(path, "Content-Type" => "application/json")
    req["Authorization"] = "Bearer #{token}" if token
    req.body = JSON.generate(body)
    http.request(req)
  end

  def test_real_server_end_to_end
    dir = Dir.mktmpdir("sidecar-server", TEST_TMP)
    port = free_port
    started = Time.now
    pid = spawn_sidecar(port, dir)
    begin
      ready_after = wait_ready(port, pid) - started
      warn format("(sidecar subprocess ready after %.1f s)", ready_after) if ENV["VERBOSE"]
      Net::HTTP.start("127.0.0.1", port, open_timeout: 1, read_timeout: 30) do |http|
        assert_equal({"status" => "ok", "sidekiq_version" => Sidekiq::VERSION}, JSON.parse(http.get("/health").body))

        res = post(http, "/jobs/execute", {"class" => "HardJob", "args" => ["é", {"a" => 1.25}], "jid" => "a" * 24})
        assert_equal "200", res.code, res.body
        assert_equal "ok", JSON.parse(res.body)["status"]

        assert_equal "401", post(http, "/jobs/execute", {"class" => "HardJob", "args" => []}, token: "bad").code
        res = post(http, "/jobs/execute", {"class" => "FailJob", "args" => [], "jid" => "b" * 24})
        assert_equal "500", res.code
        assert_equal "boom", JSON.parse(res.body)["error_message"]
        assert_equal "422", post(http, "/jobs/execute", {"class" => "Kernel", "args" => []}).code

        metrics = http.get("/metrics").body
        assert_includes metrics, %(gokiq_sidecar_jobs_total{class="HardJob",outcome="ok"} 1)
      end

      # SIGTERM while a job runs: the job finishes and is answered, then exit 0.
      slow = Thread.new do
        Net::HTTP.start("127.0.0.1", port, read_timeout: 30) do |http|
          post(http, "/jobs/execute", {"class" => "SleepJob", "args" => [1500], "jid" => "c" * 24})
        end
      end
      sleep 0.5
      Process.kill("TERM", pid)
      assert_equal "200", slow.value.code, "running job drained"
      _, status = Process.wait2(pid)
      pid = nil
      assert_equal 0, status.exitstatus

      lines = File.readlines(File.join(dir, "out.log"))
      refute_empty lines
      events = lines.map { |l| JSON.parse(l) } # stdout is JSON lines only
      assert(events.any? { |e| e["msg"] == "booted" })
      done = events.select { |e| e["msg"] == "job done" }
      assert_equal %w[ok failed invalid_class ok], done.map { |e| e["outcome"] }
      assert_equal "SleepJob", done.last["class"]
      refute_includes File.read(File.join(dir, "out.log")) + File.read(File.join(dir, "err.log")), TOKEN
    ensure
      kill_if_running(pid)
    end
  end

  # An app with a Gemfile boots through Bundler (resolved against the installed gems; nothing is
  # fetched), and one without boots on the plain gem paths (every other test here).
  def test_boots_an_app_that_has_a_gemfile_through_bundler
    dir = Dir.mktmpdir("gemfile-app", TEST_TMP)
    app = File.join(dir, "app")
    FileUtils.cp_r(EXAMPLE_APP, app)
    Dir[File.join(app, "db", "*.sqlite3*")].each { |f| File.delete(f) }
    File.write(File.join(app, "Gemfile"), <<~GEMFILE)
      source "https://rubygems.org"
      gem "railties"
      gem "activerecord"
      gem "activejob"
      gem "sidekiq"
      gem "sidekiq-cron"
      gem "puma"
      gem "sqlite3"
    GEMFILE
    port = free_port
    pid = spawn_sidecar(port, dir, root: app)
    begin
      wait_ready(port, pid)
      Net::HTTP.start("127.0.0.1", port, open_timeout: 1, read_timeout: 30) do |http|
        res = post(http, "/jobs/execute", {"class" => "HardJob", "args" => [1], "jid" => "d" * 24})
        assert_equal "200", res.code, res.body
      end
      assert File.exist?(File.join(app, "Gemfile.lock")), "Bundler did not resolve the Gemfile"
      Process.kill("TERM", pid)
      _, status = Process.wait2(pid)
      pid = nil
      assert_equal 0, status.exitstatus
    ensure
      kill_if_running(pid)
    end
  end

  # The example app's lifecycle evidence: [[event, pid], ...] in the order the hooks ran.
  def lifecycle_events(path)
    File.exist?(path) ? File.readlines(path).map { |l| e, pid = l.split; [e, Integer(pid)] } : []
  end

  def test_lifecycle_hooks_run_once_each_in_a_sidecar_process
    dir = Dir.mktmpdir("lifecycle", TEST_TMP)
    evidence = File.join(dir, "lifecycle.log")
    port = free_port
    pid = spawn_sidecar(port, dir, env: {"GOKIQ_EXAMPLE_LIFECYCLE_LOG" => evidence, "GOKIQ_EXAMPLE_BROKEN_STARTUP_HOOK" => "1"})
    begin
      wait_ready(port, pid)
      assert_equal [["startup", pid]], lifecycle_events(evidence).select { |e, _| e == "startup" },
                   "startup ran before the sidecar was ready, despite a broken startup hook next to it"
      Net::HTTP.start("127.0.0.1", port, read_timeout: 30) do |http|
        assert_equal "200", post(http, "/jobs/execute", {"class" => "NoopJob", "args" => [], "jid" => "e" * 24}).code
      end
      deadline = Time.now + 60 # the first beat runs in a thread of its own
      sleep 0.1 until lifecycle_events(evidence).any? { |e, _| e == "heartbeat" } || Time.now > deadline
      Process.kill("TERM", pid)
      assert_equal 0, wait_exit(pid).exitstatus
      pid = nil
    ensure
      kill_if_running(pid)
    end
    events = lifecycle_events(evidence)
    names = events.map(&:first)
    assert_equal %w[startup heartbeat quiet shutdown], names - ["beat"], "each once, in Sidekiq's order"
    assert_equal [events.first.last], events.map(&:last).uniq, "all from the sidecar process"
    out = File.readlines(File.join(dir, "out.log")).map { |l| JSON.parse(l) }
    raised = out.select { |l| l["msg"] == "lifecycle event raised" }
    assert_equal [["startup", "startup hook broke"]], raised.map { |l| [l["event"], l["error_message"]] }
  end

  # Puma cluster mode: each worker boots its own app, so each is a sidecar process for
  # the app's hooks (as each child of a Sidekiq swarm is); the master loads no app.
  def test_lifecycle_hooks_run_once_per_puma_worker
    dir = Dir.mktmpdir("lifecycle-cluster", TEST_TMP)
    evidence = File.join(dir, "lifecycle.log")
    port = free_port
    pid = spawn_sidecar(port, dir, env: {"GOKIQ_EXAMPLE_LIFECYCLE_LOG" => evidence}, args: %w[--workers 2])
    begin
      deadline = Time.now + 120
      sleep 0.2 until lifecycle_events(evidence).count { |e, _| e == "heartbeat" } == 2 || Time.now > deadline
      Process.kill("TERM", pid)
      assert_equal 0, wait_exit(pid).exitstatus
      pid_was = pid
      pid = nil
      by_pid = lifecycle_events(evidence).group_by(&:last)
      assert_equal 2, by_pid.size, "two workers: #{by_pid}"
      refute_includes by_pid.keys, pid_was, "the master fires nothing"
      by_pid.each_value do |events|
        assert_equal %w[startup heartbeat quiet shutdown], events.map(&:first) - ["beat"]
      end
    ensure
      kill_if_running(pid)
    end
  end

  # Waits for the process to end; kills it and fails after `seconds`.
  def wait_exit(pid, seconds = 60)
    deadline = Time.now + seconds
    loop do
      _, status = Process.wait2(pid, Process::WNOHANG)
      return status if status
      if Time.now > deadline
        kill_if_running(pid)
        flunk "sidecar still running after #{seconds} s"
      end
      sleep 0.1
    end
  end

  # Exit status 1 and stdout holding one "boot failed" line per process that tried to boot.
  def assert_boot_failure_reported(root, dir, message, workers: 0)
    pid = Process.spawn({"GOKIQ_SIDECAR_TOKEN" => TOKEN, "GOKIQ_EXAMPLE_DB" => File.join(dir, "x.sqlite3"), "RAILS_ROOT" => nil},
                        RbConfig.ruby, BIN, "--rails-root", root, "--port", free_port.to_s, "--workers", workers.to_s,
                        out: File.join(dir, "out.log"), err: File.join(dir, "err.log"))
    assert_equal 1, wait_exit(pid).exitstatus
    lines = File.readlines(File.join(dir, "out.log")).map { |l| JSON.parse(l) }
    assert_equal 1, lines.size, "one JSON line on stdout: #{lines}" if workers.zero?
    # Under --workers, a worker still booting when the master stops it may log its own line.
    assert(lines.all? { |l| l["level"] == "error" && l["msg"] == "boot failed" }, lines.inspect)
    assert(lines.any? { |l| l["error_class"] == "RuntimeError" && l["error_message"].include?(message) }, lines.inspect)
  end

  def broken_example_app(dir)
    broken = File.join(dir, "app")
    FileUtils.cp_r(EXAMPLE_APP, broken)
    Dir[File.join(broken, "db", "*.sqlite3*")].each { |f| File.delete(f) }
    File.write(File.join(broken, "config", "initializers", "zz_broken.rb"), "raise 'broken initializer'\n")
    broken
  end

  def test_boot_failure_in_an_initializer_exits_1_with_one_json_line
    dir = Dir.mktmpdir("broken-app", TEST_TMP)
    assert_boot_failure_reported(broken_example_app(dir), dir, "broken initializer")
  end

  # Instead of Puma forking new workers for ever, each to fail the same way.
  def test_boot_failure_in_a_puma_worker_stops_the_sidecar_with_1
    dir = Dir.mktmpdir("broken-cluster", TEST_TMP)
    assert_boot_failure_reported(broken_example_app(dir), dir, "broken initializer", workers: 2)
  end

  # Fails within milliseconds, before Puma could have installed its signal handlers.
  def test_instant_boot_failure_exits_1
    dir = Dir.mktmpdir("instant-failure", TEST_TMP)
    app = File.join(dir, "app")
    FileUtils.mkdir_p(File.join(app, "config"))
    File.write(File.join(app, "config", "environment.rb"), "raise 'broken environment'\n")
    assert_boot_failure_reported(app, dir, "broken environment")
  end

  def test_refuses_to_start_without_token
    out, status = Open3.capture2e({"GOKIQ_SIDECAR_TOKEN" => nil}, RbConfig.ruby, BIN, "--rails-root", EXAMPLE_APP,
                                  "--port", free_port.to_s)
    refute status.success?
    assert_includes out, "GOKIQ_SIDECAR_TOKEN is not set"
  end
end
