// Command reference-oracle reads image references as JSON strings, one a line, on stdin and
// prints, one JSON object a line, how github.com/distribution/reference reads each: as the
// container runtime does (ParseDockerRef, which calls ParseNormalizedNamed).
package main

import (
	"bufio"
	_ "crypto/sha256" // go-digest verifies only algorithms whose hash is linked in, as a runtime links them
	_ "crypto/sha512"
	"encoding/json"
	"fmt"
	"os"

	"github.com/distribution/reference"
)

type result struct {
	OK        bool   `json:"ok"`
	Error     string `json:"error,omitempty"`
	Domain    string `json:"domain,omitempty"`
	Path      string `json:"path,omitempty"`
	Tag       string `json:"tag,omitempty"`
	Digest    string `json:"digest,omitempty"`
	DockerRef string `json:"docker_ref,omitempty"`
	Panic     string `json:"panic,omitempty"`
}

func evaluate(input string) (r result) {
	defer func() {
		if p := recover(); p != nil {
			r = result{Panic: fmt.Sprint(p)}
		}
	}()
	named, err := reference.ParseNormalizedNamed(input)
	if err != nil {
		return result{Error: err.Error()}
	}
	docker, err := reference.ParseDockerRef(input)
	if err != nil {
		return result{Error: "ParseDockerRef: " + err.Error()}
	}
	r = result{OK: true, Domain: reference.Domain(named), Path: reference.Path(named), DockerRef: docker.String()}
	if tagged, ok := named.(reference.Tagged); ok {
		r.Tag = tagged.Tag()
	}
	if digested, ok := named.(reference.Digested); ok {
		r.Digest = digested.Digest().String()
	}
	return r
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 64<<20)
	out := bufio.NewWriter(os.Stdout)
	enc := json.NewEncoder(out)
	enc.SetEscapeHTML(false)
	for in.Scan() {
		var input string
		var r result
		if err := json.Unmarshal(in.Bytes(), &input); err != nil {
			r = result{Panic: "bad input line: " + err.Error()}
		} else {
			r = evaluate(input)
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
