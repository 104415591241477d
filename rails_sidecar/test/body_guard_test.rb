require_relative "server_test"

# The real bin/gokiq-sidecar (Puma) over raw sockets: a body is refused from its headers,
# before Puma would buffer it (to a Tempfile past 112 KB). Without the guard, Puma waits for the
# whole body and only then asks the app, so none of these requests is answered until it is sent.
class BodyGuardTest < ServerTest
  MAX_BODY = 200_000

  # Only the tests below, not ServerTest's again.
  def self.runnable_methods
    public_instance_methods(false).grep(/\Atest_/).map(&:to_s)
  end

  def setup
    @dir = Dir.mktmpdir("sidecar-guard", TEST_TMP)
    @port = free_port
    env = {"GOKIQ_SIDECAR_TOKEN" => TOKEN, "GOKIQ_EXAMPLE_DB" => File.join(@dir, "guard.sqlite3"),
           "REDIS_URL" => "redis://127.0.0.1:1/0", "RAILS_ROOT" => nil}
    @pid = Process.spawn(env, RbConfig.ruby, BIN, "--port", @port.to_s, "--threads", "1:2",
                         "--max-body-bytes", MAX_BODY.to_s, "--rails-root", EXAMPLE_APP,
                         out: File.join(@dir, "out.log"), err: File.join(@dir, "err.log"))
    wait_ready(@port, @pid)
  end

  def teardown
    kill_if_running(@pid)
  end

  # Sends `head`, then (optionally) part of a body, and reads what comes back without sending
  # the rest; nil if nothing came within 10 s (Puma still waiting for the body).
  def answer_to(head, partial_body = "")
    socket = TCPSocket.new("127.0.0.1", @port)
    socket.write(head)
    socket.write(partial_body) unless partial_body.empty?
    return nil unless socket.wait_readable(10)
    response = socket.read
    status = response[/\AHTTP\/1\.1 (\d+)/, 1]
    [status, JSON.parse(response.split("\r\n\r\n", 2).last)]
  rescue Errno::ECONNRESET, Errno::EPIPE
    ["reset", nil]
  ensure
    socket&.close
  end

  def head(length: nil, chunked: false, token: nil)
    lines = ["POST /jobs/execute HTTP/1.1", "Host: x", "Content-Type: application/json"]
    lines << "Authorization: Bearer #{token}" if token
    lines << "Content-Length: #{length}" if length
    lines << "Transfer-Encoding: chunked" if chunked
    lines.join("\r\n") + "\r\n\r\n"
  end

  def chunk(data)
    "#{data.bytesize.to_s(16)}\r\n#{data}\r\n"
  end

  def test_unauthenticated_body_refused_from_its_headers
    assert_equal ["401", {"status" => "unauthorized"}], answer_to(head(length: 50_000_000), "{" * 1000)
    assert_equal ["401", {"status" => "unauthorized"}], answer_to(head(length: 10_000_000, token: "wrong"))
    assert_equal ["401", {"status" => "unauthorized"}], answer_to(head(chunked: true), chunk("x" * 1000))
  end

  # More body than Puma reads at once (64 KB) is still unread when the connection is closed.
  # Without the half-close before it, the client got a reset in place of the 401.
  def test_a_client_still_sending_its_body_reads_the_whole_refusal
    3.times do
      assert_equal ["401", {"status" => "unauthorized"}], answer_to(head(length: 50_000_000), "{" * 300_000)
    end
  end

  def test_declared_length_over_the_limit_refused_before_the_body
    assert_equal ["413", {"status" => "too_large"}], answer_to(head(length: 10_000_000_000, token: TOKEN))
  end

  def test_chunked_body_refused_once_past_the_limit
    # 200,001 bytes, no terminating chunk. Crossing the limit with the last byte sent lets the
    # server read everything before it answers (unread data would turn its close into a reset).
    body = chunk("x" * 100_000) * 2 + chunk("x")
    assert_equal ["413", {"status" => "too_large"}], answer_to(head(chunked: true, token: TOKEN), body)
  end

  def test_jobs_within_the_limit_still_run_and_the_server_keeps_serving
    job = JSON.generate("class" => "NoopJob", "args" => ["x" * 150_000], "jid" => "d" * 24) # > 112 KB
    Net::HTTP.start("127.0.0.1", @port, read_timeout: 30) do |http|
      assert_equal "200", post(http, "/jobs/execute", JSON.parse(job)).code
      chunked = Net::HTTP::Post.new("/jobs/execute", "Content-Type" => "application/json",
                                                     "Authorization" => "Bearer #{TOKEN}", "Transfer-Encoding" => "chunked")
      chunked.body_stream = StringIO.new(job)
      assert_equal "200", http.request(chunked).code
      assert_equal "200", http.get("/health").code
    end
  end
end
