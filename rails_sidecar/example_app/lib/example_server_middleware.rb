# A server middleware of the kind real apps have (tenancy, tracing, ...).
# Jobs ask `ExampleServerMiddleware.active?` and store it in JobRun#middleware.
class ExampleServerMiddleware
  def self.active?
    Thread.current[:example_server_middleware] == true
  end

  def call(_worker, _job, _queue)
    Thread.current[:example_server_middleware] = true
    yield
  ensure
    Thread.current[:example_server_middleware] = nil
  end
end
