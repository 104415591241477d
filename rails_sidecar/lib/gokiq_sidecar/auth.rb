require "digest"
require "openssl"

module GokiqSidecar
  # Bearer-token check. Both sides are hashed first so the comparison is
  # constant-time and length-independent; the compare is OpenSSL's (C), not
  # Rack's byte loop in Ruby, which was most of this check's cost per job.
  class Auth
    # Set by PumaGuard once it has checked a request's token, so App does not hash it again.
    # A client cannot set it: Rack names every request header HTTP_*.
    CHECKED = "gokiq.token_checked"

    def self.insecure
      new(nil)
    end

    def initialize(token)
      @digest = token && Digest::SHA256.digest(token)
    end

    def enabled?
      !@digest.nil?
    end

    def allowed?(env)
      return true unless enabled?
      return true if env[CHECKED]
      header = env["HTTP_AUTHORIZATION"].to_s
      return false unless header.start_with?("Bearer ")
      given = header.delete_prefix("Bearer ").strip
      OpenSSL.fixed_length_secure_compare(Digest::SHA256.digest(given), @digest)
    end

    # allowed?, remembered in env for the rest of this request.
    def check(env)
      allowed?(env) && (env[CHECKED] = true)
    end
  end
end
