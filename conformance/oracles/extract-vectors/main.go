// Command extract-vectors reads the upstream _test.go files of an oracle's module and prints,
// as one JSON document, every string its test code spells out (literals, `+` concatenations,
// strings.Repeat of literals, and package-level string constants and variables), and every
// map[string]string literal (label maps). The conformance suite runs each string through the
// oracle and through arcguard; the oracle, not the test's own expectation, is the reference.
//
// Usage: extract-vectors DIR [DIR...]   (each DIR's *_test.go files, recursively)
package main

import (
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

type output struct {
	Files     map[string]int      `json:"files"`
	Inputs    []string            `json:"inputs"`
	LabelMaps []map[string]string `json:"label_maps"`
}

type extractor struct {
	names map[string]string // package-level string constants and variables
}

// eval gives the string value of e when the test code spells it out.
func (x *extractor) eval(e ast.Expr) (string, bool) {
	switch e := e.(type) {
	case *ast.BasicLit:
		if e.Kind != token.STRING && e.Kind != token.CHAR {
			return "", false
		}
		if e.Kind == token.CHAR {
			r, _, _, err := strconv.UnquoteChar(e.Value[1:len(e.Value)-1], '\'')
			return string(r), err == nil
		}
		s, err := strconv.Unquote(e.Value)
		return s, err == nil
	case *ast.ParenExpr:
		return x.eval(e.X)
	case *ast.Ident:
		s, ok := x.names[e.Name]
		return s, ok
	case *ast.BinaryExpr:
		if e.Op != token.ADD {
			return "", false
		}
		a, ok := x.eval(e.X)
		if !ok {
			return "", false
		}
		b, ok := x.eval(e.Y)
		return a + b, ok
	case *ast.CallExpr:
		sel, ok := e.Fun.(*ast.SelectorExpr)
		if !ok || len(e.Args) != 2 {
			return "", false
		}
		pkg, ok := sel.X.(*ast.Ident)
		if !ok || pkg.Name != "strings" || sel.Sel.Name != "Repeat" {
			return "", false
		}
		s, ok := x.eval(e.Args[0])
		if !ok {
			return "", false
		}
		lit, ok := e.Args[1].(*ast.BasicLit)
		if !ok || lit.Kind != token.INT {
			return "", false
		}
		n, err := strconv.Atoi(lit.Value)
		if err != nil || n < 0 || n > 100000 {
			return "", false
		}
		return strings.Repeat(s, n), true
	}
	return "", false
}

func isStringMapType(e ast.Expr) bool {
	m, ok := e.(*ast.MapType)
	if !ok {
		return false
	}
	k, kok := m.Key.(*ast.Ident)
	v, vok := m.Value.(*ast.Ident)
	return kok && vok && k.Name == "string" && v.Name == "string"
}

// labelMap gives the map a composite literal spells out, if it is a map[string]string literal
// (its type written, or elided inside a composite of such maps).
func (x *extractor) labelMap(lit *ast.CompositeLit, elided bool) (map[string]string, bool) {
	if !(isStringMapType(lit.Type) || (lit.Type == nil && elided)) {
		return nil, false
	}
	labels := map[string]string{}
	for _, elt := range lit.Elts {
		kv, ok := elt.(*ast.KeyValueExpr)
		if !ok {
			return nil, false
		}
		k, kok := x.eval(kv.Key)
		v, vok := x.eval(kv.Value)
		if !kok || !vok {
			return nil, false
		}
		labels[k] = v
	}
	return labels, true
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: extract-vectors DIR [DIR...]")
		os.Exit(2)
	}
	fset := token.NewFileSet()
	var files []*ast.File
	out := output{Files: map[string]int{}}
	var names []string
	for _, dir := range os.Args[1:] {
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, "_test.go") {
				return err
			}
			f, err := parser.ParseFile(fset, path, nil, 0)
			if err != nil {
				return err
			}
			files = append(files, f)
			rel, _ := filepath.Rel(dir, path)
			names = append(names, filepath.Join(filepath.Base(dir), rel))
			return nil
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	x := &extractor{names: map[string]string{}}
	// Package-level names first, until no more resolve (one may be built from another).
	for changed := true; changed; {
		changed = false
		for _, f := range files {
			for _, decl := range f.Decls {
				gen, ok := decl.(*ast.GenDecl)
				if !ok || (gen.Tok != token.CONST && gen.Tok != token.VAR) {
					continue
				}
				for _, spec := range gen.Specs {
					vs := spec.(*ast.ValueSpec)
					if len(vs.Names) != len(vs.Values) {
						continue
					}
					for i, name := range vs.Names {
						if _, done := x.names[name.Name]; done {
							continue
						}
						if s, ok := x.eval(vs.Values[i]); ok {
							x.names[name.Name] = s
							changed = true
						}
					}
				}
			}
		}
	}
	seen := map[string]bool{}
	seenMaps := map[string]bool{}
	for i, f := range files {
		count := 0
		var visit func(n ast.Node, elidedMaps bool)
		visit = func(n ast.Node, elidedMaps bool) {
			ast.Inspect(n, func(n ast.Node) bool {
				if n == nil {
					return false
				}
				if lit, ok := n.(*ast.CompositeLit); ok {
					if labels, ok := x.labelMap(lit, elidedMaps); ok {
						key, _ := json.Marshal(labels)
						if !seenMaps[string(key)] {
							seenMaps[string(key)] = true
							out.LabelMaps = append(out.LabelMaps, labels)
						}
					}
					// Elements of []map[string]string{...} (and values of a map of such maps)
					// may elide their type.
					inner := false
					switch t := lit.Type.(type) {
					case *ast.ArrayType:
						inner = isStringMapType(t.Elt)
					case *ast.MapType:
						inner = isStringMapType(t.Value)
					}
					for _, elt := range lit.Elts {
						if kv, ok := elt.(*ast.KeyValueExpr); ok {
							visit(kv.Key, false)
							visit(kv.Value, inner)
						} else {
							visit(elt, inner)
						}
					}
					return false
				}
				if e, ok := n.(ast.Expr); ok {
					if s, ok := x.eval(e); ok {
						count++
						if !seen[s] {
							seen[s] = true
							out.Inputs = append(out.Inputs, s)
						}
					}
				}
				return true
			})
		}
		visit(f, false)
		out.Files[names[i]] = count
	}
	sort.Strings(out.Inputs)
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", " ")
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
