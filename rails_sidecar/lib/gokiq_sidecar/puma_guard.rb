require "json"

module GokiqSidecar
  # Puma (5.6) reads a request's whole body before the Rack app sees the request, into a
  # Tempfile once it is over 112 KB, so App's token and size checks come too late to protect the
  # disk: anyone who reaches the port could fill it. This hook makes the same two checks as soon
  # as the headers are in, before a byte of body is buffered:
  # - a request with a body (Content-Length > 0, or chunked) without the token: 401;
  # - a Content-Length over --max-body-bytes: 413;
  # - a chunked body that grows past --max-body-bytes: 413 when the chunk that crosses it arrives;
  # each answered in App's JSON, then the connection is closed.
  # Puma 5.6 has no setting for this (6.3 added http_content_length_limit, for the size only).
  module PumaGuard
    class << self
      attr_reader :auth, :max_body
    end

    def self.install(auth:, max_body:)
      @auth = auth
      @max_body = max_body
      ::Puma::Client.prepend(ClientHook) unless ::Puma::Client <= ClientHook
    end

    def self.response(code, body)
      text = JSON.generate(body)
      reason = {401 => "Unauthorized", 413 => "Payload Too Large"}.fetch(code)
      "HTTP/1.1 #{code} #{reason}\r\nContent-Type: application/json\r\n" \
        "Content-Length: #{text.bytesize}\r\nConnection: close\r\n\r\n#{text}"
    end

    # Prepended to Puma::Client: setup_body runs once the headers are parsed, write_chunk for
    # every decoded piece of a chunked body.
    module ClientHook
      private

      def setup_body
        length = @env["CONTENT_LENGTH"].to_s
        has_body = @env.key?("HTTP_TRANSFER_ENCODING") || length.to_i > 0
        refuse(401, status: "unauthorized") if has_body && !PumaGuard.auth.check(@env)
        refuse(413, status: "too_large") if length.to_i > PumaGuard.max_body
        super
      end

      def write_chunk(str)
        refuse(413, status: "too_large") if @chunked_content_length + str.bytesize > PumaGuard.max_body
        super
      end

      def refuse(code, body)
        begin
          @io << PumaGuard.response(code, body)
          # The body the client is still sending stays unread, and closing a socket with unread
          # data sends a reset instead of a FIN: a client that has not yet read the answer then
          # gets ECONNRESET in place of it. Half-closing first puts the FIN right after the
          # answer, so the client reads the answer and its end whatever follows.
          @io.close_write
        rescue StandardError
          # the client went away: nothing to tell it
        end
        # Puma closes the connection on this error without writing anything more or logging.
        raise ::Puma::ConnectionError
      end
    end
  end
end
