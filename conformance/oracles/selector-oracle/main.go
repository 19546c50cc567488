// Command selector-oracle reads Calico selector requests as JSON objects, one a line, on stdin:
// {"selector": "...", "labels": [{"k": "v"}, ...]}; and prints, one JSON object a line, whether
// Calico's own parser (libcalico-go/lib/selector) accepts the selector, its canonical String(),
// and, for each label map, whether the selector selects it (Calico's Evaluate).
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/sirupsen/logrus"

	"github.com/projectcalico/calico/libcalico-go/lib/selector"
)

type request struct {
	Selector string              `json:"selector"`
	Labels   []map[string]string `json:"labels"`
}

type result struct {
	OK      bool   `json:"ok"`
	Error   string `json:"error,omitempty"`
	String  string `json:"string,omitempty"`
	Matches []bool `json:"matches,omitempty"`
	Panic   string `json:"panic,omitempty"`
}

func evaluate(req request) (r result) {
	defer func() {
		if p := recover(); p != nil {
			r = result{Panic: fmt.Sprint(p)}
		}
	}()
	sel, err := selector.Parse(req.Selector)
	if err != nil {
		return result{Error: err.Error()}
	}
	r = result{OK: true, String: sel.String(), Matches: make([]bool, 0, len(req.Labels))}
	for _, labels := range req.Labels {
		r.Matches = append(r.Matches, sel.Evaluate(labels))
	}
	return r
}

func main() {
	// The parser logs every selector at debug level; keep stdout for results only.
	logrus.SetOutput(io.Discard)
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 64<<20)
	out := bufio.NewWriter(os.Stdout)
	enc := json.NewEncoder(out)
	enc.SetEscapeHTML(false)
	for in.Scan() {
		var req request
		var r result
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			r = result{Panic: "bad input line: " + err.Error()}
		} else {
			r = evaluate(req)
		}
		if err := enc.Encode(r); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := out.Flush(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
