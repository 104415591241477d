class RetryZeroJob
  include Sidekiq::Worker
  sidekiq_options retry: 0

  def perform(*)
    raise "retry zero"
  end
end
