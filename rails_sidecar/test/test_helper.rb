# Boots the example app once per test process, against a fresh sqlite file in
# a temp dir (parallel runs never share a db), in Sidekiq server mode exactly
# as bin/gokiq-sidecar does.
require "tmpdir"
require "fileutils"

SIDECAR_ROOT = File.expand_path("..", __dir__)
EXAMPLE_APP = File.join(SIDECAR_ROOT, "example_app")
TEST_TMP = Dir.mktmpdir("gokiq-sidecar-test")
at_exit { FileUtils.rm_rf(TEST_TMP) }

ENV["GOKIQ_EXAMPLE_DB"] = File.join(TEST_TMP, "test.sqlite3")
ENV["RAILS_ENV"] ||= "test"
# A job that enqueues must never reach the developer's Redis from a test.
ENV["REDIS_URL"] = "redis://127.0.0.1:1/0"

$LOAD_PATH.unshift File.join(SIDECAR_ROOT, "lib")
require "gokiq_sidecar"
require "gokiq_sidecar/boot"
require "gokiq_sidecar/cli"
# As bin/gokiq-sidecar does with --threads: the jobs' Redis pool follows it.
TEST_THREADS = 13
GokiqSidecar::Boot.frameworks
GokiqSidecar::SidekiqConfig.current.concurrency = TEST_THREADS
GokiqSidecar::Boot.application(EXAMPLE_APP)
# Keep the test summary readable: ActiveJob logs every (deliberately) failing
# job with its backtrace. The sidecar's own JSON log is captured per test.
Sidekiq.logger.level = Logger::FATAL
Rails.logger.level = Logger::FATAL

require "minitest/autorun"
require "rack/test"
require "stringio"
require "json"

module SidecarTestHelpers
  include Rack::Test::Methods

  TOKEN = "test-token-123"

  def log_io
    @log_io ||= StringIO.new
  end

  def state
    @state ||= GokiqSidecar::State.new(:ready)
  end

  def app
    @app ||= GokiqSidecar::App.new(auth: GokiqSidecar::Auth.new(TOKEN), state: state,
                                   logger: GokiqSidecar::JsonLogger.new(log_io),
                                   max_body_bytes: @max_body_bytes || GokiqSidecar::App::DEFAULT_MAX_BODY)
  end

  def authed
    header "Authorization", "Bearer #{TOKEN}"
  end

  # A new app whose job policy allows `entries` (the app's allow-list setting).
  def with_allow(*entries)
    @_rack_test_sessions = @_rack_test_current_session = nil # rack-test keeps the first app
    @app = GokiqSidecar::App.new(auth: GokiqSidecar::Auth.new(TOKEN), state: state,
                                 logger: GokiqSidecar::JsonLogger.new(log_io),
                                 policy: GokiqSidecar::JobPolicy.new(entries))
  end

  # Positional `auth` on purpose: braceless string-keyed hashes in calls like
  # execute("class" => ...) would otherwise be taken as keyword arguments.
  def post_json(path, body, auth = true)
    # rack-test keeps headers between requests; drop the token explicitly.
    auth ? authed : header("Authorization", nil)
    header "Content-Type", "application/json"
    post path, body.is_a?(String) ? body : JSON.generate(body)
  end

  def execute(job, auth = true)
    post_json("/jobs/execute", job, auth)
  end

  def json
    JSON.parse(last_response.body)
  end

  def new_jid
    SecureRandom.hex(12)
  end

  def log_lines
    log_io.string.lines.map { |l| JSON.parse(l) }
  end

  def runs(jid)
    JobRun.where(jid: jid).order(:id).to_a
  end
end
