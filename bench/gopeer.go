// gopeer.go: the real etcd Go client (clientv3 and clientv3/concurrency of
// etcd 3.4) locking and unlocking, uncontended, as the benchmark's peers.
//
// Each of N goroutines takes and releases its own lock name (PREFIX<n>) for
// --secs seconds; every lock+unlock pair is timed.  What a pair is depends on
// --mode:
//
//	service  one clientv3.Client and one concurrency.Session per goroutine,
//	         made before the clock starts and reused for every lock (the
//	         documented best practice): Mutex.Lock (one txn when
//	         uncontended) and Mutex.Unlock (one delete).
//	shared   the same, with one client and one session shared by all
//	         goroutines (one gRPC connection, one lease).
//	blog     the client-per-lock pattern of blog posts and of the Go code
//	         that motivated etcd_lock: clientv3.New, NewSession (lease
//	         grant, keepalive stream), Mutex.Lock, Mutex.Unlock,
//	         Session.Close (lease revoke), Client.Close, all timed.
//	floor    the two requests etcd_lock itself sends (recipe.c), over gRPC:
//	         the txn "create NAME/<lease> if absent, attached to the lease,
//	         and range the two newest keys under NAME/", then the txn
//	         "delete NAME/<lease> if its create_revision is still mine".
//	         One client and one lease per goroutine, granted before the
//	         clock starts: the gRPC counterpart of bench/floor.c.
//
// It prints the line the C drivers print (bench/bench_common.h):
//
//	RESULT ops=N secs=S ops_s=X p50_ms=Y p99_ms=Z errors=E conns=C requests=R cpu_ms_per_op=U
//
// conns counts the gRPC transport connections opened, requests the unary
// calls sent while the clock ran (the blog's keepalive stream is not a
// unary call), cpu_ms_per_op this process's CPU time per pair.
//
//	gopeer --mode service --endpoints http://127.0.0.1:2379 --clients 8 --secs 5
//	       [--prefix P] [--cacert ca.pem --cert client.pem --key client-key.pem]
//
// Built by bench/run.sh in GOPATH mode against Debian's golang-etcd-server-dev.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/concurrency"
	"go.etcd.io/etcd/pkg/transport"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/stats"
)

var (
	mode      = flag.String("mode", "service", "service, shared, blog or floor")
	endpoints = flag.String("endpoints", "", "comma-separated etcd endpoints")
	clients   = flag.Int("clients", 1, "concurrent goroutines, each on its own lock name")
	secs      = flag.Float64("secs", 5, "seconds to run")
	prefix    = flag.String("prefix", "bench/go/", "lock names are PREFIX<n>")
	cacert    = flag.String("cacert", "", "CA certificate (TLS)")
	cert      = flag.String("cert", "", "client certificate (TLS)")
	key       = flag.String("key", "", "client key (TLS)")
	ttl       = flag.Int("ttl", 60, "session (lease) TTL in seconds")
)

var (
	connsOpened int64 // gRPC transport connections
	unaryCalls  int64 // unary calls, counted only while counting != 0
	counting    int32
)

// connCounter counts the connections a client's gRPC transport opens.
type connCounter struct{}

func (connCounter) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context   { return ctx }
func (connCounter) HandleRPC(context.Context, stats.RPCStats)                         {}
func (connCounter) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (connCounter) HandleConn(_ context.Context, s stats.ConnStats) {
	if _, ok := s.(*stats.ConnBegin); ok {
		atomic.AddInt64(&connsOpened, 1)
	}
}

func countCalls(ctx context.Context, method string, req, reply interface{},
	cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if atomic.LoadInt32(&counting) != 0 {
		atomic.AddInt64(&unaryCalls, 1)
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

var cfg clientv3.Config

func setup() {
	flag.Parse()
	if *endpoints == "" || *clients < 1 || *secs <= 0 || flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	logc := zap.NewProductionConfig()
	logc.Level = zap.NewAtomicLevelAt(zap.ErrorLevel)
	cfg = clientv3.Config{
		Endpoints:   strings.Split(*endpoints, ","),
		DialTimeout: 5 * time.Second,
		LogConfig:   &logc,
		DialOptions: []grpc.DialOption{
			grpc.WithStatsHandler(connCounter{}),
			grpc.WithChainUnaryInterceptor(countCalls),
		},
	}
	if *cacert != "" || *cert != "" {
		info := transport.TLSInfo{TrustedCAFile: *cacert, CertFile: *cert, KeyFile: *key}
		t, err := info.ClientConfig()
		if err != nil {
			fmt.Fprintln(os.Stderr, "TLS:", err)
			os.Exit(2)
		}
		cfg.TLS = t
	}
}

// One session: a client and a concurrency.Session on it.
type session struct {
	cli *clientv3.Client
	s   *concurrency.Session
}

func openSession() (*session, error) {
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, err
	}
	s, err := concurrency.NewSession(cli, concurrency.WithTTL(*ttl))
	if err != nil {
		cli.Close()
		return nil, err
	}
	return &session{cli, s}, nil
}

func (ss *session) close() {
	ss.s.Close()
	ss.cli.Close()
}

func lockUnlock(ctx context.Context, s *concurrency.Session, name string) error {
	m := concurrency.NewMutex(s, name)
	if err := m.Lock(ctx); err != nil {
		return fmt.Errorf("lock: %w", err)
	}
	if err := m.Unlock(ctx); err != nil {
		return fmt.Errorf("unlock: %w", err)
	}
	return nil
}

// floorPair sends etcd_lock's two requests for an uncontended lock+unlock.
func floorPair(ctx context.Context, kv clientv3.KV, name string, lease clientv3.LeaseID) error {
	pfx := name + "/"
	mykey := fmt.Sprintf("%s%x", pfx, lease)
	resp, err := kv.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(mykey), "=", 0)).
		Then(clientv3.OpPut(mykey, "", clientv3.WithLease(lease)),
			clientv3.OpGet(pfx, clientv3.WithPrefix(),
				clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortDescend),
				clientv3.WithLimit(2), clientv3.WithKeysOnly())).
		Else(clientv3.OpGet(mykey)).
		Commit()
	if err != nil {
		return fmt.Errorf("enqueue txn: %w", err)
	}
	// ours must be the only key under NAME/
	if !resp.Succeeded || len(resp.Responses[1].GetResponseRange().Kvs) != 1 {
		return fmt.Errorf("lock not owned: %v", resp)
	}
	myrev := resp.Header.Revision
	resp, err = kv.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(mykey), "=", myrev)).
		Then(clientv3.OpDelete(mykey)).
		Commit()
	if err != nil {
		return fmt.Errorf("release txn: %w", err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("unlock failed: %v", resp)
	}
	return nil
}

type worker struct {
	lat   []float64 // seconds per pair
	err   error
	tEnd  time.Time
	setup func() error            // before the clock starts
	pair  func(name string) error // one timed lock+unlock
	done  func()                  // after the clock stops
}

func newWorker(shared *session) *worker {
	ctx := context.Background()
	w := &worker{}
	switch *mode {
	case "service":
		var ss *session
		w.setup = func() (err error) { ss, err = openSession(); return }
		w.pair = func(name string) error { return lockUnlock(ctx, ss.s, name) }
		w.done = func() {
			if ss != nil {
				ss.close()
			}
		}
	case "shared":
		w.pair = func(name string) error { return lockUnlock(ctx, shared.s, name) }
	case "blog":
		w.pair = func(name string) error {
			ss, err := openSession()
			if err != nil {
				return err
			}
			defer ss.close()
			return lockUnlock(ctx, ss.s, name)
		}
	case "floor":
		var cli *clientv3.Client
		var lease clientv3.LeaseID
		w.setup = func() error {
			var err error
			if cli, err = clientv3.New(cfg); err != nil {
				return err
			}
			g, err := cli.Grant(ctx, int64(*secs)+60)
			if err != nil {
				return err
			}
			lease = g.ID
			return nil
		}
		w.pair = func(name string) error { return floorPair(ctx, cli, name, lease) }
		w.done = func() {
			if lease != 0 {
				cli.Revoke(ctx, lease)
			}
			if cli != nil {
				cli.Close()
			}
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown --mode", *mode)
		os.Exit(2)
	}
	return w
}

func pct(v []float64, p float64) float64 {
	if len(v) == 0 {
		return 0
	}
	return v[int(p*float64(len(v)-1)+0.5)]
}

func main() {
	setup()
	var shared *session
	if *mode == "shared" {
		var err error
		if shared, err = openSession(); err != nil {
			fmt.Fprintln(os.Stderr, "session:", err)
			os.Exit(1)
		}
	}

	workers := make([]*worker, *clients)
	var ready, finished sync.WaitGroup
	start := make(chan struct{})
	var tStart, deadline time.Time
	for i := range workers {
		w := newWorker(shared)
		workers[i] = w
		name := fmt.Sprintf("%s%d", *prefix, i)
		ready.Add(1)
		finished.Add(1)
		go func() {
			defer finished.Done()
			if w.setup != nil {
				w.err = w.setup()
			}
			ready.Done()
			<-start
			for w.err == nil && time.Now().Before(deadline) {
				t0 := time.Now()
				if w.err = w.pair(name); w.err == nil {
					w.lat = append(w.lat, time.Since(t0).Seconds())
				}
			}
			w.tEnd = time.Now()
		}()
	}
	// every goroutine has its client, session or lease: start the clock
	ready.Wait()
	atomic.StoreInt64(&connsOpened, 0)
	atomic.StoreInt32(&counting, 1)
	tStart = time.Now()
	deadline = tStart.Add(time.Duration(*secs * float64(time.Second)))
	close(start)
	finished.Wait()
	atomic.StoreInt32(&counting, 0)
	conns := atomic.LoadInt64(&connsOpened)
	requests := atomic.LoadInt64(&unaryCalls)

	var all []float64
	errors := 0
	tEnd := tStart
	for i, w := range workers {
		all = append(all, w.lat...)
		if w.err != nil {
			errors++
			fmt.Fprintf(os.Stderr, "client %d: %v\n", i, w.err)
		}
		if w.tEnd.After(tEnd) {
			tEnd = w.tEnd
		}
	}
	sort.Float64s(all)
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
	n := len(all)
	elapsed := tEnd.Sub(tStart).Seconds()
	perOp := 0.0
	if n > 0 {
		perOp = cpu * 1000 / float64(n)
	}
	fmt.Printf("RESULT ops=%d secs=%.3f ops_s=%.1f p50_ms=%.3f p99_ms=%.3f errors=%d conns=%d requests=%d cpu_ms_per_op=%.3f\n",
		n, elapsed, float64(n)/elapsed, pct(all, 0.5)*1000, pct(all, 0.99)*1000,
		errors, conns, requests, perOp)

	for _, w := range workers {
		if w.done != nil {
			w.done()
		}
	}
	if shared != nil {
		shared.close()
	}
	if errors > 0 || n == 0 {
		os.Exit(1)
	}
}
