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

  def spawn_sidecar(port, dir, root: EXAMPLE_APP)
    env = {"GOKIQ_SIDECAR_TOKEN" => TOKEN, "GOKIQ_EXAMPLE_DB" => File.join(dir, "server.sqlite3"),
           "REDIS_URL" => "redis://127.0.0.1:1/0", "RAILS_ROOT" => nil}
    Process.spawn(env, RbConfig.ruby, BIN, "--port", port.to_s, "--threads", "2:4", "--drain-timeout", "10",
                  "--rails-root", root, out: File.join(dir, "out.log"), err: File.join(dir, "err.log"))
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
        assert_equal({"status" => "ok"}, JSON.parse(http.get("/health").body))

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

  def test_boot_failure_exits_non_zero
    broken = File.join(Dir.mktmpdir("broken-app", TEST_TMP), "app")
    FileUtils.cp_r(EXAMPLE_APP, broken)
    Dir[File.join(broken, "db", "*.sqlite3*")].each { |f| File.delete(f) }
    File.write(File.join(broken, "config", "initializers", "zz_broken.rb"), "raise 'broken initializer'\n")
    out, status = Open3.capture2e({"GOKIQ_SIDECAR_TOKEN" => TOKEN, "GOKIQ_EXAMPLE_DB" => File.join(broken, "x.sqlite3")},
                                  RbConfig.ruby, BIN, "--rails-root", broken, "--port", free_port.to_s)
    assert_equal 1, status.exitstatus
    assert_includes out, "boot failed"
    assert_includes out, "broken initializer"
  end

  def test_refuses_to_start_without_token
    out, status = Open3.capture2e({"GOKIQ_SIDECAR_TOKEN" => nil}, RbConfig.ruby, BIN, "--rails-root", EXAMPLE_APP,
                                  "--port", free_port.to_s)
    refute status.success?
    assert_includes out, "GOKIQ_SIDECAR_TOKEN is not set"
  end
end
