// promql-names prints the metric names that PromQL expressions select, with Prometheus's own
// parser (github.com/prometheus/prometheus/promql/parser, the one promtool and Prometheus use).
//
// Input on stdin: one expression per line (blank lines skipped). Output: one line per
// expression, its line number, a tab and its metric names separated by spaces, sorted. Exits 1
// if an expression does not parse, or selects series without naming one metric (a selector
// with no name, or a regular expression on __name__), which could not be checked.
//
// Built by tests/cluster/build.sh beside promtool, from the same module version; used by
// tests/alerts/check.sh.
package main

import (
	"bufio"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

func main() {
	p := parser.NewParser(parser.Options{})
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	failed := false
	line := 0
	for in.Scan() {
		line++
		q := strings.TrimSpace(in.Text())
		if q == "" {
			continue
		}
		names, err := metricNames(p, q)
		if err != nil {
			fmt.Fprintf(os.Stderr, "line %d: %v: %s\n", line, err, q)
			failed = true
			continue
		}
		fmt.Printf("%d\t%s\n", line, strings.Join(names, " "))
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if failed {
		os.Exit(1)
	}
}

// metricNames returns the metric names that q selects, sorted and de-duplicated.
func metricNames(p parser.Parser, q string) ([]string, error) {
	expr, err := p.ParseExpr(q)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var bad error
	parser.Inspect(expr, func(node parser.Node, _ []parser.Node) error {
		vs, ok := node.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		for _, m := range vs.LabelMatchers {
			if m.Name != labels.MetricName {
				continue
			}
			if m.Type != labels.MatchEqual {
				bad = fmt.Errorf("selector %s matches __name__ with %s", vs, m.Type)
				continue
			}
			name = m.Value
		}
		if name == "" {
			bad = fmt.Errorf("selector %s names no metric", vs)
			return nil
		}
		seen[name] = true
		return nil
	})
	if bad != nil {
		return nil, bad
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	sort.Strings(names)
	return names, nil
}
