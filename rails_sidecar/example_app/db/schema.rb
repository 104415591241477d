module ExampleSchema
  TABLES = %w[people job_runs flaky_attempts].freeze

  def self.current?(conn)
    TABLES.all? { |t| conn.table_exists?(t) }
  end

  def self.load(conn)
    conn.create_table :people, if_not_exists: true do |t|
      t.string :name
      t.timestamps
    end
    # One row per job run. `middleware` is true when ExampleServerMiddleware
    # wrapped the run (our evidence that the server middleware chain ran).
    conn.create_table :job_runs, if_not_exists: true do |t|
      t.string :job_class
      t.string :jid
      t.text :args
      t.text :note
      t.boolean :middleware, default: false, null: false
      t.datetime :created_at
    end
    conn.add_index :job_runs, :jid, if_not_exists: true
    conn.create_table :flaky_attempts, if_not_exists: true do |t|
      t.string :key
      t.datetime :created_at
    end
    conn.add_index :flaky_attempts, :key, if_not_exists: true
  end
end
