require "digest"
require "rack/utils"

module GokiqSidecar
  # Bearer-token check. Both sides are hashed first so the comparison is
  # constant-time and length-independent (secure_compare needs equal lengths).
  class Auth
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
      header = env["HTTP_AUTHORIZATION"].to_s
      return false unless header.start_with?("Bearer ")
      given = header.delete_prefix("Bearer ").strip
      Rack::Utils.secure_compare(Digest::SHA256.digest(given), @digest)
    end
  end
end
