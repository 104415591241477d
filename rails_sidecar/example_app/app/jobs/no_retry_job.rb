class NoRetryJob
  include Sidekiq::Worker
  sidekiq_options retry: false

  def perform(*)
    raise "no retry"
  end
end
